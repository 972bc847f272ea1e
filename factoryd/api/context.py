"""What the HTTP API is given by the daemon: settings, ledger, paths, station passphrase, live view."""

from __future__ import annotations

from dataclasses import dataclass, field

from factoryd.api.limits import LoadLimits
from factoryd.config import Settings
from factoryd.firmware import FIRMWARE_IMAGE_MAX_BYTES
from factoryd.jobs.scheduler import Station
from factoryd.ledger import DEFAULT_MAX_BYTES, AsyncLedger
from factoryd.pki.bundle import MAX_BUNDLE_BYTES
from factoryd.service import StationPaths
from factoryd.telemetry.limits import RejectListener
from factoryd.telemetry.live import LiveState

# Boundaries, part headers and the small text fields of a multipart upload, on top of its files.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# A lot or token request is a few hundred bytes; 64 KiB leaves room for a verbose profile.
JSON_BODY_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class UploadLimits:
    """Upper bounds on request bodies; anything larger is refused with 413 before it is stored."""

    id_list_bytes: int = DEFAULT_MAX_BYTES
    bundle_file_bytes: int = MAX_BUNDLE_BYTES
    firmware_image_bytes: int = FIRMWARE_IMAGE_MAX_BYTES
    json_bytes: int = JSON_BODY_MAX_BYTES
    overhead_bytes: int = MULTIPART_OVERHEAD_BYTES


@dataclass
class ApiContext:
    """Everything the API's routes use; built by the daemon (or a test)."""

    settings: Settings
    ledger: AsyncLedger
    paths: StationPaths
    # Stores bundles and signs manifests; never logged or returned.
    passphrase: bytes = field(repr=False)
    live: LiveState
    # None when the API runs without a station (port routes then answer 503).
    station: Station | None
    limits: UploadLimits = field(default_factory=UploadLimits)
    # Request rates and open event streams (api/limits.py), and who counts the refusals (metrics).
    load: LoadLimits = field(default_factory=LoadLimits)
    on_reject: RejectListener | None = None
