"""Load limits of the HTTP API and the station page: beyond them a quick 429 or 503, never a wait.

- Request rate per client address and per credential (bearer token or page session): 429 with
  ``Retry-After``. Refused before routing, token lookup and the audit trail, so a flood costs
  the station a few microseconds per request, no ledger write (a summary is logged instead).
- Open station-page event streams (``/station/events``): each one renders every port change, so
  their number is capped; one more gets 503 with ``Retry-After`` (the page's EventSource retries).
- Body sizes: ``api/auth.py`` (413); connections: ``api/server.py`` ``MAX_CONNECTIONS`` (503).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from factoryd.telemetry.limits import RejectListener, TokenBuckets, retry_after_header

log = structlog.get_logger(__name__)

EVENTS_PATH = "/station/events"
# Refusals are logged at most this often (with the count since the last line): a flood is one line.
REJECT_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class LoadLimits:
    """How much a client may ask of a station: a handful of pages, a CLI, a supervisor's scripts."""

    # Per credential: a page polls nothing (it streams; a load is ~6 requests), a CLI command makes a
    # few calls, an import script a burst. Every accepted call costs a token lookup and an audit write
    # in the ledger the line writes to, so the sustained rate is what a busy supervisor needs, no more.
    client_rate_per_s: float = 5.0
    client_burst: int = 60
    # Per address (every credential behind it, and the unauthenticated ones).
    address_rate_per_s: float = 10.0
    address_burst: int = 120
    # Open event streams for the whole station (each costs a render per port change).
    max_event_streams: int = 8


class LoadLimitMiddleware:
    """Pure ASGI middleware refusing requests past the rate and stream limits (outermost)."""

    def __init__(
        self,
        app: ASGIApp,
        limits: LoadLimits,
        on_reject: RejectListener | None = None,
        addresses: TokenBuckets | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self._on_reject = on_reject
        # Shared with the server's connection handler (api/server.py), which refuses before parsing.
        self._addresses = addresses or address_buckets(limits)
        self._clients = TokenBuckets(limits.client_rate_per_s, limits.client_burst)
        self.streams = 0
        self.rejected = 0
        self._unlogged = 0
        self._logged_at = float("-inf")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse or pass one call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        wait_s = self._addresses.take(address)
        credential = _credential(scope)
        if not wait_s and credential is not None:
            wait_s = self._clients.take(credential)
        path = str(scope.get("path", ""))
        if wait_s:
            await self._refuse(send, path, 429, "too many requests from this client; slow down", wait_s)
            return
        if path != EVENTS_PATH:
            await self.app(scope, receive, send)
            return
        if self.streams >= self.limits.max_event_streams:
            detail = (
                f"too many station pages open ({self.limits.max_event_streams}); close one or retry later"
            )
            await self._refuse(send, path, 503, detail, 5.0)
            return
        self.streams += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.streams -= 1

    async def _refuse(self, send: Send, path: str, status: int, detail: str, wait_s: float) -> None:
        self.rejected += 1
        self._unlogged += 1
        if self._on_reject is not None:
            self._on_reject("events" if path == EVENTS_PATH else "api", status)
        now = time.monotonic()
        if now - self._logged_at >= REJECT_LOG_INTERVAL_S:
            log.warning("api load limit reached: requests refused", refused=self._unlogged, status=status)
            self._logged_at, self._unlogged = now, 0
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", retry_after_header(wait_s).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def address_buckets(limits: LoadLimits) -> TokenBuckets:
    """The per-address request budget of ``limits``."""
    return TokenBuckets(limits.address_rate_per_s, limits.address_burst)


def refusal_bytes(status: int, reason: str, detail: str, wait_s: float) -> bytes:
    """A whole HTTP/1.1 refusal (JSON detail, Retry-After, connection closed)."""
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"retry-after: {retry_after_header(wait_s)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def _credential(scope: Scope) -> str | None:
    """A short hash of the caller's bearer token or session cookie (never the secret itself)."""
    for name, value in scope.get("headers") or ():
        if name in (b"authorization", b"cookie"):
            return hashlib.sha256(value).hexdigest()[:24]
    return None
