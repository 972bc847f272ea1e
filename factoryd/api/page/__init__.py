"""The operator's station page (``GET /station``): a live slot grid fed by server-sent events.

``sessions`` (signed cookies, CSRF, the reader/writer/operator dependencies), ``labels`` (what the
page says: reasons, step labels and order, grid), ``feed`` (typed telemetry to typed views, the SSE
stream) and ``routes`` (the router and its action endpoints).
"""
