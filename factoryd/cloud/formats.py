"""The export formats' names, kept apart from the writers so the CLI's help stays fast."""

from __future__ import annotations

from enum import StrEnum


class ExportFormat(StrEnum):
    """What ``factoryd manifest export --format`` and ``GET /lots/{lot}/export`` write."""

    JSON = "json"  # the signed manifest (factoryd.pki.manifest), not written by factoryd.cloud.exports
    CSV = "csv"
    AWS_BULK = "aws-bulk"
    NRFCLOUD = "nrfcloud"
    AZURE_DPS = "azure-dps"
