"""Device labels: per-lot templates, ZPL, previews from the same ZPL, raw-TCP printers, a durable queue."""
