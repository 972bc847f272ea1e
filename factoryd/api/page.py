"""The operator's station page: ``GET /station``, a live slot grid fed by server-sent events.

Sessions: the login form takes an API token once (POST, never in a URL) and answers with an
HttpOnly, SameSite=Strict cookie signed with the station's page key (32 random bytes in the
state directory, 0600) so a daemon restart keeps the page logged in. The cookie names the
token; every use re-checks that token (revoked, expired, role) in the token store. Page
actions (``POST /station/actions/...``) need an operator or admin session plus a CSRF token
derived from the cookie (double-submit, sent as a header) and a same-origin ``Origin``; each is
written to the audit trail before it takes effect. A bearer token works too (no CSRF needed).

The event stream (``GET /station/events``) turns :class:`LiveState` updates into render-ready
slot, lot and event views (:class:`StationFeed`), one snapshot first, a keepalive comment every
15 s, and ends when the station stops so the daemon never waits on an open browser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import html
import json
import math
import os
import secrets
import string
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse

from factoryd.api.auth import (
    OPERATE_ROLES,
    READ_ROLES,
    STATE_PRINCIPAL,
    STATE_REJECTED,
    Principal,
    api_context,
    authenticate,
    token_store,
)
from factoryd.api.context import ApiContext
from factoryd.api.errors import TokenNotFoundError, TokenRejectedError
from factoryd.api.routes import LOT_NAME
from factoryd.api.tokens import TokenInfo
from factoryd.config import PageConfig
from factoryd.errors import ConfigError, FactorydError
from factoryd.ledger import LotState
from factoryd.ledger.model import LotInfo

log = structlog.get_logger(__name__)

SESSION_COOKIE = "factoryd_station"
CSRF_HEADER = "X-Factoryd-CSRF"
# One shift plus margin: an operator logs in once per shift, not every hour.
SESSION_TTL_S = 12 * 3600
# Comment lines keep proxies and the browser from timing the stream out (the brief: ~15 s).
KEEPALIVE_S = 15.0
# How soon a stream notices the station stopping, so shutdown never waits for a browser.
STOP_POLL_S = 0.5
# EventSource reconnect delay the stream asks for.
SSE_RETRY_MS = 2000
# A token is ~64 characters; the form body needs a few hundred bytes at most.
LOGIN_BODY_MAX_BYTES = 4096
# Lot states are re-read from the ledger at most this often per stream, so a burst of finished
# boards costs one query; the scheduler publishes progress every 2 s anyway.
LOT_STATE_CACHE_S = 0.5
# Events shown in the "last events" list.
EVENTS_SHOWN = 15
PAGE_KEY_FILE = "station-page.key"
PAGE_KEY_BYTES = 32
_STATIC = resources.files("factoryd.api").joinpath("static")
_ASSETS = {
    "station.css": "text/css; charset=utf-8",
    "station.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not "no-referrer": Chrome then sends "Origin: null" on same-origin form posts.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

# Reason codes (FactorydError.reason) as sentences an operator at the fixture can act on.
REASON_TEXT: dict[str, str] = {
    "csr_rejected": "The board's certificate request was wrong (name, key or signature). Put it aside.",
    "board_timeout": "The board stopped answering. Reseat it and retry.",
    "readback_mismatch": "The board did not store its certificate correctly. Retry once, then put it aside.",
    "board_flood": "The board sends garbage on its serial line. Put it aside.",
    "identity_mismatch": "The board claims another board's identity (a clone?). Put it aside.",
    "refused_board": "This board may not be provisioned in this lot (done before?). Tell the supervisor.",
    "hub_command": "The USB hub did not switch this port. Check the hub and its cable.",
    "enumeration_timeout": "The board did not show up on USB. Reseat it or check the cable.",
    "challenge_failed": "The board could not prove it holds its new key. Put it aside.",
    "verification": "The board's answer failed a check. Put it aside.",
    "firmware_rejected": "The board refused the firmware image. Tell the supervisor.",
    "board_locked": "The board's secure element is already locked. Put it aside.",
    "board_busy": "The board stayed busy. Reseat it and retry.",
    "board_status": "The board reported an error. Reseat it and retry.",
    "board_reset": "The board rebooted during provisioning. Reseat it and retry.",
    "protocol_violation": "The board answered nonsense. Reseat it and retry.",
    "link_closed": "The USB serial link dropped. Reseat the board and retry.",
    "link_open": "The board's serial port could not be opened. Reseat the board and retry.",
    "frame": "The serial link garbles data. Reseat the board and retry.",
    "crc": "The serial link garbles data. Reseat the board and retry.",
    "ids_exhausted": "The lot has no device IDs left. Tell the supervisor.",
    "reservation_conflict": "The ledger refused a device ID for this board. Tell the supervisor.",
    "lot_state": "The lot is paused or closed.",
    "ledger_unavailable": "The station's database cannot be reached. Tell the supervisor.",
    "issuance": "The station could not issue the certificate. Tell the supervisor.",
    "signer": "The lot's CA key cannot be used. Tell the supervisor.",
    "job_aborted": "Stopped by the operator or a station shutdown.",
}

# Pipeline steps in order (factoryd.jobs.pipeline.Step) with the words the page shows.
STEP_TEXT: dict[str, str] = {
    "power": "Switching the port on",
    "enumerate": "Waiting for USB",
    "hello": "Identifying the board",
    "firmware": "Flashing firmware",
    "reserve": "Reserving a device ID",
    "keygen": "Making the key in the secure element",
    "csr": "Reading the certificate request",
    "issue": "Issuing the certificate",
    "write": "Writing and reading back",
    "challenge": "Checking the new key",
    "lock": "Locking the secure element",
    "record": "Recording the device",
}
STEPS = tuple(STEP_TEXT)
_STEP_EXTRA = {"recheck": "Re-checking a provisioned board"}

_STATE_TITLE = {
    "empty": "Empty",
    "disabled": "Disabled",
    "powering": "Powering",
    "enumerating": "USB…",
    "provisioning": "Working",
    "done": "Done",
    "failed": "Failed",
    "attention": "Attention",
    "idle": "Idle",
    "unknown": "—",
}


def reason_text(reason: str | None) -> str:
    """A failure reason (code or message) as one operator sentence."""
    if not reason:
        return "Failed for an unknown reason. Retry, or put the board aside."
    sentence = REASON_TEXT.get(reason)
    if sentence is not None:
        return sentence
    if reason.replace("_", "").isalnum() and reason.islower():
        return f"Failed ({reason.replace('_', ' ')}). Retry, or put the board aside."
    return reason[:200]


def grid_shape(ports: int, rows: int, columns: int) -> tuple[int, int]:
    """(rows, columns) of the slot grid: configured sizes, 0 = automatic, grown to fit every port."""
    count = max(ports, 1)
    if rows == 0 and columns == 0:
        columns = math.ceil(math.sqrt(count))
    elif columns == 0:
        columns = math.ceil(count / rows)
    rows = max(rows, math.ceil(count / columns))
    return rows, columns


def slot_order(hub_ports: Iterable[str], page: PageConfig) -> list[str]:
    """Ports in fixture order: those named in page.slots first (in that order), then the rest."""
    ports = list(hub_ports)
    known = set(ports)
    first = [p for p in page.slots if p in known]
    return first + [p for p in ports if p not in set(first)]


# Session cookies ----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_page_key(state_dir: Path) -> bytes:
    """The station's page key (created 0600 on first use); signs session cookies and CSRF tokens."""
    path = state_dir / PAGE_KEY_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = state_dir / f".{PAGE_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(PAGE_KEY_BYTES))
                out.flush()
                os.fsync(out.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != PAGE_KEY_BYTES:
        raise ConfigError(f"{path} holds {len(key)} bytes, not a {PAGE_KEY_BYTES}-byte page key; delete it")
    return key


@dataclass(frozen=True)
class PageSession:
    """A logged-in station page: who, until when, and the CSRF token its page carries."""

    principal: Principal
    token_id: int
    expires_at: int
    csrf: str


class SessionSigner:
    """Signs and checks session cookies and their CSRF tokens with the page key."""

    def __init__(self, key: bytes) -> None:
        """A signer with ``key``."""
        self._key = key

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self._key, purpose + b"\0" + data, hashlib.sha256).digest()

    def issue(self, token: TokenInfo, now: float) -> tuple[str, int]:
        """A new cookie value for ``token`` and its expiry (unix seconds)."""
        expires = int(now) + SESSION_TTL_S
        if token.expires_at is not None:
            expires = min(expires, int(token.expires_at.timestamp()))
        payload = json.dumps(
            {"v": 1, "id": token.id, "n": token.name, "exp": expires, "r": secrets.token_hex(8)},
            separators=(",", ":"),
        ).encode()
        return f"{_b64(payload)}.{_b64(self._mac(b'session', payload))}", expires

    def csrf(self, cookie: str) -> str:
        """The CSRF token bound to a session cookie."""
        return _b64(self._mac(b"csrf", cookie.encode("ascii")))

    def check(self, cookie: str, now: float) -> tuple[int, str, int] | None:
        """(token id, token name, expiry) of a genuine, unexpired cookie; None otherwise."""
        body, _, mac = cookie.partition(".")
        try:
            payload = _unb64(body)
            genuine = hmac.compare_digest(_unb64(mac), self._mac(b"session", payload))
            data = json.loads(payload) if genuine else None
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("v") != 1:
            return None
        token_id, name, expires = data.get("id"), data.get("n"), data.get("exp")
        if not (isinstance(token_id, int) and isinstance(name, str) and isinstance(expires, int)):
            return None
        if expires <= now:
            return None
        return token_id, name, expires


def _signer(request: Request) -> SessionSigner:
    signer: SessionSigner | None = getattr(request.app.state, "station_page_signer", None)
    if signer is None:
        signer = SessionSigner(load_page_key(api_context(request).paths.state_dir))
        request.app.state.station_page_signer = signer
    return signer


def _remember(request: Request, principal: Principal) -> None:
    """Name the caller for the audit middleware."""
    request.scope.setdefault("state", {})[STATE_PRINCIPAL] = principal


def _live_token(info: TokenInfo, token_id: int) -> bool:
    if info.id != token_id or info.revoked_at is not None or info.role not in READ_ROLES:
        return False
    return info.expires_at is None or info.expires_at > datetime.now(UTC)


async def cookie_session(request: Request) -> PageSession | None:
    """The page session of the request's cookie, if it is genuine and its token still valid."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or not cookie.isascii():
        return None
    signer = _signer(request)
    checked = signer.check(cookie, time.time())
    if checked is None:
        return None
    token_id, name, expires = checked
    try:
        info = await asyncio.to_thread(token_store(request).get, name)
    except TokenNotFoundError:
        return None
    if not _live_token(info, token_id):
        request.scope.setdefault("state", {})[STATE_REJECTED] = name
        return None
    principal = Principal.of(info)
    _remember(request, principal)
    return PageSession(principal, token_id, expires, signer.csrf(cookie))


async def page_reader(request: Request) -> Principal:
    """A supervisor, operator or admin, by session cookie or bearer token (401/403 otherwise)."""
    if "authorization" in request.headers:
        principal = await authenticate(request)
    else:
        session = await cookie_session(request)
        if session is None:
            raise HTTPException(401, "not logged in to the station page (or the session expired)")
        principal = session.principal
    if principal.role not in READ_ROLES:
        raise HTTPException(403, f"a {principal.role} token cannot open the station page")
    return principal


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True  # same-origin navigations and non-browser clients; the CSRF token still applies
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == f"{request.url.scheme}://{request.url.netloc}"


async def page_writer(request: Request) -> Principal:
    """Any page user sending a change: bearer token, or cookie session plus Origin and CSRF checks."""
    if "authorization" in request.headers:
        principal = await authenticate(request)
    else:
        if not _same_origin(request):
            raise HTTPException(403, "cross-origin request refused")
        session = await cookie_session(request)
        if session is None:
            raise HTTPException(401, "not logged in to the station page (or the session expired)")
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header; reload the page")
        principal = session.principal
    if principal.role not in READ_ROLES:
        raise HTTPException(403, f"a {principal.role} token cannot use the station page")
    return principal


async def page_operator(request: Request) -> Principal:
    """An operator or admin sending an action (bearer token, or cookie session with CSRF token)."""
    principal = await page_writer(request)
    if principal.role not in OPERATE_ROLES:
        raise HTTPException(403, f"a {principal.role} token may only watch the station page")
    return principal


Reader = Annotated[Principal, Depends(page_reader)]
Writer = Annotated[Principal, Depends(page_writer)]
Operator = Annotated[Principal, Depends(page_operator)]
Ctx = Annotated[ApiContext, Depends(api_context)]


# Views ----------------------------------------------------------------------------------------------


@dataclass
class _Result:
    """A slot's resting state, shown until the next board's job starts.

    After a board the port loop keeps powering the port to look for the next one: an empty slot
    or a finished board left in it must not flicker through "powering" on every rescan.
    """

    state: str  # "done", "failed" or "empty"
    reason: str | None = None
    device_id: str | None = None


class StationFeed:
    """Turns LiveState messages into what the page renders; one per event stream."""

    def __init__(self, ctx: ApiContext) -> None:
        """A feed over ``ctx``'s live state and station."""
        self.ctx = ctx
        self.ports: dict[str, dict[str, Any]] = {}
        self.results: dict[str, _Result] = {}
        self.lots: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._sent: dict[str, dict[str, Any]] = {}
        self._lot_infos: list[LotInfo] = []
        self._lots_read_at: float | None = None

    # Layout -----------------------------------------------------------------------------------

    def port_names(self) -> list[str]:
        """Every port in fixture order (the station's, plus any only seen in updates)."""
        station = self.ctx.station
        hub = list(station.ports) if station is not None else []
        hub += sorted(p for p in self.ports if p not in set(hub))
        return slot_order(hub, self.ctx.settings.page)

    def label(self, port: str) -> str:
        """The label printed on the fixture for ``port`` (the port name when none is configured)."""
        return self.ctx.settings.page.slots.get(port, port)

    # Messages ---------------------------------------------------------------------------------

    async def apply(self, message: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None]]:
        """The (SSE event name, data) pairs to send for one LiveState message."""
        kind = message.get("type")
        if kind == "snapshot":
            self._load_snapshot(message)
            snapshot = await self.snapshot()
            self._sent = {view["port"]: view for view in snapshot["slots"]}
            return [("snapshot", snapshot)]
        if kind == "port":
            self._on_port(message)
            return self._changed(str(message["port"]))
        if kind == "event":
            if message.get("kind") == "step":
                return []  # steps reach the page through port updates
            self._on_event(message)
            self.events = [*self.events, message][-EVENTS_SHOWN:]
            sent = [("event", self.event_view(message)), *self._changed(str(message["port"]))]
            if message.get("kind") in ("job_finished", "job_failed"):
                # Counts move with every finished board, not only with the 2-second progress tick.
                sent.append(("lot", await self.lot_panel(fresh_counts=True)))
            return sent
        if kind == "lot":
            self.lots[str(message["lot"])] = message
            return [("lot", await self.lot_panel())]
        return []

    def _changed(self, port: str) -> list[tuple[str, dict[str, Any] | None]]:
        """The slot's view if it differs from what this page last got (rescans change nothing)."""
        view = self.slot(port)
        if self._sent.get(port) == view:
            return []
        self._sent[port] = view
        return [("slot", view)]

    def _load_snapshot(self, snapshot: dict[str, Any]) -> None:
        self.ports = dict(snapshot.get("ports", {}))
        self.lots = dict(snapshot.get("lots", {}))
        self.results = {}
        events = list(snapshot.get("events", []))
        for event in events:
            self._on_event(event)
        for update in self.ports.values():
            self._on_port(update)
        self.events = [e for e in events if e.get("kind") != "step"][-EVENTS_SHOWN:]

    def _attention(self, port: str) -> str | None:
        station = self.ctx.station
        control = station.ports.get(port) if station is not None else None
        return control.attention if control is not None else None

    def _on_port(self, update: dict[str, Any]) -> None:
        port, state = str(update["port"]), update.get("state")
        self.ports[port] = update
        if state == "done":
            self.results[port] = _Result("done", device_id=update.get("device_id"))
        elif state == "attention" and self._attention(port) is None:
            # The pipeline's own report of a failed board: keep the job_failed event's code if any.
            known = self.results.get(port)
            code = known.reason if known is not None and known.state == "failed" else update.get("reason")
            self.results[port] = _Result("failed", reason=code, device_id=update.get("device_id"))
        elif state == "empty":
            self.results[port] = _Result("empty")
        elif state in ("disabled", "idle"):
            self.results.pop(port, None)

    def _on_event(self, event: dict[str, Any]) -> None:
        port, kind = str(event["port"]), event.get("kind")
        if kind == "job_started":
            self.results.pop(port, None)
        elif kind == "job_failed":
            self.results[port] = _Result(
                "failed", reason=event.get("reason"), device_id=event.get("device_id")
            )

    # Views ------------------------------------------------------------------------------------

    def slot(self, port: str) -> dict[str, Any]:
        """What one slot tile shows."""
        update = self.ports.get(port)
        station = self.ctx.station
        control = station.ports.get(port) if station is not None else None
        live_state = str(update["state"]) if update else "unknown"
        step = update.get("step") if update else None
        result = self.results.get(port)
        view: dict[str, Any] = {
            "port": port,
            "label": self.label(port),
            "enabled": control.enabled if control is not None else True,
            "busy": control.busy if control is not None else False,
            "device_id": update.get("device_id") if update else None,
            "attempt": update.get("attempt", 0) if update else 0,
            "step": None,
            "step_index": None,
            "step_total": None,
        }
        if control is not None and control.attention is not None:
            state = "attention"
            last = control.last.reason if control.last is not None else None
            if last is None and result is not None and result.state == "failed":
                last = result.reason
            if control.failures_in_row == 1:
                detail = f"The board failed: {reason_text(last)}"
            elif control.failures_in_row:
                detail = f"{control.failures_in_row} boards failed in a row. Last: {reason_text(last)}"
            else:
                detail = reason_text(control.attention)
            detail += " Check the fixture, then Retry or Acknowledge."
        elif result is not None and live_state in ("powering", "enumerating", "done", "attention", "empty"):
            # The resting state stays on show until the next board's job starts (a board left in
            # the slot, or an empty slot, is only looked at on each rescan).
            state = result.state
            detail = {
                "failed": reason_text(result.reason),
                "done": "Provisioned. Take the board out.",
            }.get(state, "Insert a board.")
            view["device_id"] = result.device_id
        elif live_state == "provisioning":
            state = "provisioning"
            detail = STEP_TEXT.get(str(step), _STEP_EXTRA.get(str(step), str(step or "")))
            if step in STEPS:
                view["step_index"] = STEPS.index(step) + 1
                view["step_total"] = len(STEPS)
            view["step"] = step
        else:
            state = live_state
            detail = {
                "empty": "Insert a board.",
                "disabled": "Switched off by an operator.",
                "powering": "Switching the port on.",
                "enumerating": "Waiting for the board on USB.",
                "idle": "No active lot.",
                "unknown": "Waiting for the station.",
            }.get(state, "")
            if state == "done":
                detail = "Provisioned. Take the board out."
            if state == "attention":  # not the station's attention (e.g. no lot can be opened)
                state, detail = "failed", reason_text(update.get("reason") if update else None)
        if state == "provisioning" and view["step_index"] is not None:
            title = f"Step {view['step_index']} of {view['step_total']}"
        else:
            title = _STATE_TITLE.get(state, state.title())
        view.update(state=state, title=title, detail=detail)
        return view

    def event_view(self, event: dict[str, Any]) -> dict[str, Any]:
        """One line of the "last events" list."""
        kind = event.get("kind")
        device = event.get("device_id")
        if kind == "job_started":
            text, tone = "Started a board", "info"
        elif kind == "job_finished":
            verb = "Re-checked" if event.get("outcome") == "rechecked" else "Provisioned"
            seconds = event.get("duration_s")
            took = f" in {seconds:.1f} s" if isinstance(seconds, int | float) else ""
            text, tone = f"{verb} {device or 'a board'}{took}", "ok"
        elif kind == "job_failed":
            verb = "Refused" if event.get("outcome") == "refused" else "Failed"
            text, tone = f"{verb}: {reason_text(event.get('reason'))}", "bad"
        elif kind == "retry":
            text, tone = f"Retrying ({event.get('reason') or 'unknown'})", "warn"
        else:
            text, tone = str(kind), "info"
        port = str(event.get("port"))
        return {"at": event.get("at"), "port": port, "label": self.label(port), "text": text, "tone": tone}

    async def _lot_infos_now(self) -> list[LotInfo]:
        now = time.monotonic()
        if self._lots_read_at is None or now - self._lots_read_at >= LOT_STATE_CACHE_S:
            self._lot_infos = await self.ctx.ledger.list_lots()
            self._lots_read_at = now
        return self._lot_infos

    async def lot_panel(self, *, fresh_counts: bool = False) -> dict[str, Any] | None:
        """The active (or paused) lot with its counts and the station's throughput."""
        try:
            infos = await self._lot_infos_now()
            wanted = self.ctx.settings.jobs.lot
            candidates = [i for i in infos if i.state in (LotState.ACTIVE, LotState.PAUSED)]
            candidates.sort(key=lambda i: (i.name != wanted, i.state is not LotState.ACTIVE, i.name))
            if not candidates:
                return None
            info = candidates[0]
            if fresh_counts or info.name not in self.lots:
                progress = await self.ctx.ledger.progress(info.name)
                self.lots[info.name] = dataclasses.asdict(progress)
        except FactorydError as exc:
            log.warning("station page cannot read lots", error=str(exc))
            return {"name": None, "error": "Lot information is unavailable (database)."}
        counts = self.lots[info.name]
        station = self.ctx.station
        failed = (station.outcomes["failed"] + station.outcomes["refused"]) if station else None
        total, done, void = counts.get("total"), counts.get("provisioned"), counts.get("void")
        remaining = None
        if isinstance(total, int) and isinstance(done, int) and isinstance(void, int):
            remaining = total - done - void
        return {
            "name": info.name,
            "customer": info.customer,
            "state": info.state.value,
            "target": info.target_quantity,
            "total": total,
            "done": done,
            "remaining": remaining,
            "void": void,
            "failed": failed,
            "units_per_hour": round(self.ctx.live.units_per_hour(datetime.now(UTC)), 1),
        }

    async def snapshot(self) -> dict[str, Any]:
        """Everything the page needs to draw itself from scratch."""
        names = self.port_names()
        rows, columns = grid_shape(len(names), self.ctx.settings.page.rows, self.ctx.settings.page.columns)
        return {
            "station": self.ctx.settings.station.name,
            "line": self.ctx.settings.station.line,
            "rows": rows,
            "columns": columns,
            "slots": [self.slot(p) for p in names],
            "lot": await self.lot_panel(),
            "events": [self.event_view(e) for e in self.events],
        }


def sse(event: str, data: dict[str, Any] | None) -> str:
    """One server-sent event (JSON on a single data line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _stopping(ctx: ApiContext) -> bool:
    return ctx.station is not None and ctx.station.stopping


async def _next(updates: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    return await anext(updates)


async def event_stream(request: Request, ctx: ApiContext) -> AsyncIterator[str]:
    """The page's SSE stream: a snapshot, then views of every change, keepalives, end on stop."""
    feed = StationFeed(ctx)
    yield f"retry: {SSE_RETRY_MS}\n\n"
    async with ctx.live.subscribe() as updates:
        pending: asyncio.Task[dict[str, Any]] | None = None
        quiet_since = checked_at = time.monotonic()
        try:
            while not _stopping(ctx):
                if time.monotonic() - checked_at >= KEEPALIVE_S:
                    # A revoked token or an expired session ends the stream, busy or not.
                    if "authorization" not in request.headers and await cookie_session(request) is None:
                        yield sse("logout", {})
                        return
                    checked_at = time.monotonic()
                if pending is None:
                    pending = asyncio.create_task(_next(updates), name="station-page-next")
                done, _ = await asyncio.wait({pending}, timeout=STOP_POLL_S)
                if pending in done:
                    message, pending = pending.result(), None
                    for name, data in await feed.apply(message):
                        yield sse(name, data)
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                    yield ": keepalive\n\n"
                    quiet_since = time.monotonic()
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
            closer = getattr(updates, "aclose", None)
            if closer is not None:
                await closer()


# Pages ------------------------------------------------------------------------------------------------


def _template(name: str) -> string.Template:
    return string.Template(_STATIC.joinpath(name).read_text(encoding="utf-8"))


def _html(body: str, status: int = 200) -> HTMLResponse:
    headers = {**_SECURITY_HEADERS, "Cache-Control": "no-store"}
    return HTMLResponse(body, status_code=status, headers=headers)


def _login_page(ctx: ApiContext, message: str = "", status: int = 200) -> HTMLResponse:
    body = _template("login.html").substitute(
        station=html.escape(ctx.settings.station.name),
        message=html.escape(message),
        message_class="error" if message else "hidden",
    )
    return _html(body, status)


router = APIRouter(tags=["station page"])


@router.get("/station", response_class=HTMLResponse, include_in_schema=False)
async def station_page(request: Request, ctx: Ctx) -> HTMLResponse:
    """The station page for a logged-in session, else the login form."""
    session = await cookie_session(request)
    if session is None:
        return _login_page(ctx)
    who = session.principal
    body = _template("station.html").substitute(
        station=html.escape(ctx.settings.station.name),
        user=html.escape(who.name),
        role=html.escape(who.role.value),
        operate="true" if who.role in OPERATE_ROLES else "false",
        csrf=html.escape(session.csrf),
    )
    return _html(body)


@router.post("/station/login", include_in_schema=False)
async def login(request: Request, ctx: Ctx) -> Response:
    """Take an API token from the form once; answer with a session cookie (303 to /station)."""
    if not _same_origin(request):
        raise HTTPException(403, "cross-origin login refused")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_BODY_MAX_BYTES:
            raise HTTPException(413, f"login form over {LOGIN_BODY_MAX_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), max_num_fields=4)
    except (UnicodeDecodeError, ValueError):
        return _login_page(ctx, "The form could not be read.", 400)
    token = (fields.get("token") or [""])[0].strip()
    if not token:
        return _login_page(ctx, "Enter an API token.", 400)
    try:
        info = await asyncio.to_thread(token_store(request).authenticate, token)
    except TokenRejectedError as exc:
        if exc.name is not None:
            request.scope.setdefault("state", {})[STATE_REJECTED] = exc.name
        return _login_page(ctx, "That token is not valid (unknown, expired or revoked).", 401)
    principal = Principal.of(info)
    _remember(request, principal)
    if principal.role not in READ_ROLES:
        return _login_page(ctx, f"A {principal.role} token cannot open the station page.", 403)
    cookie, expires = _signer(request).issue(info, time.time())
    response = RedirectResponse("/station", status_code=303, headers=_SECURITY_HEADERS)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=max(expires - int(time.time()), 0),
        path="/station",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    log.info("station page login", actor=principal.name, role=principal.role.value)
    return response


@router.post("/station/logout", include_in_schema=False)
async def logout(who: Writer) -> Response:
    """End the page session (the cookie is dropped; the token itself stays valid)."""
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/station", httponly=True, samesite="strict")
    return response


@router.get("/station/session", include_in_schema=False)
async def session_info(who: Reader) -> dict[str, Any]:
    """Who the page is logged in as (401 when not): the page asks before reconnecting."""
    return {"name": who.name, "role": who.role.value, "operate": who.role in OPERATE_ROLES}


@router.get("/station/static/{name}", include_in_schema=False)
async def static_asset(name: str) -> Response:
    """The page's own CSS and JavaScript (no CDN: a factory network has no internet)."""
    media = _ASSETS.get(name)
    if media is None:
        raise HTTPException(404, f"no asset {name!r}")
    data = _STATIC.joinpath(name).read_bytes()
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    return Response(data, media_type=media, headers={"Cache-Control": "no-cache", "ETag": etag})


@router.get("/station/events", include_in_schema=False)
async def station_events(request: Request, ctx: Ctx, who: Reader) -> StreamingResponse:
    """Server-sent events: a snapshot, then slot, lot and event views as the line runs."""
    return StreamingResponse(
        event_stream(request, ctx),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# Actions ------------------------------------------------------------------------------------------------


def _port_of(ctx: ApiContext, port: str) -> str:
    if ctx.station is None:
        raise HTTPException(503, "no station is running in this process")
    if port not in ctx.station.ports:
        raise HTTPException(404, f"no port {port!r} on this station")
    return port


async def _audit(ctx: ApiContext, who: Principal, action: str, subject: str) -> None:
    """Write the action to the audit trail before it takes effect (no trail, no action)."""
    await ctx.ledger.audit(
        actor=who.name, action=f"station.{action}", subject=subject, details={"via": "station page"}
    )


async def _port_action(ctx: ApiContext, who: Principal, port: str, action: str) -> dict[str, Any]:
    _port_of(ctx, port)
    await _audit(ctx, who, f"port.{action}", port)
    station = ctx.station
    if station is None:  # stopped while the audit entry was written
        raise HTTPException(503, "no station is running in this process")
    if action == "retry":
        station.retry(port)
    elif action == "ack":
        station.acknowledge(port)
    else:
        station.enable(port, action == "enable")
    log.info("station page action", actor=who.name, action=action, port=port)
    return {"ok": True, "port": port, "action": action}


@router.post("/station/actions/ports/{port}/retry", include_in_schema=False)
async def action_retry(ctx: Ctx, who: Operator, port: str) -> dict[str, Any]:
    """Run the slot again now (even with the same board in it); clears attention."""
    return await _port_action(ctx, who, port, "retry")


@router.post("/station/actions/ports/{port}/ack", include_in_schema=False)
async def action_ack(ctx: Ctx, who: Operator, port: str) -> dict[str, Any]:
    """Acknowledge the slot's attention state: it goes back to work with the next board."""
    return await _port_action(ctx, who, port, "ack")


@router.post("/station/actions/ports/{port}/disable", include_in_schema=False)
async def action_disable(ctx: Ctx, who: Operator, port: str) -> dict[str, Any]:
    """Switch the slot off after its current board."""
    return await _port_action(ctx, who, port, "disable")


@router.post("/station/actions/ports/{port}/enable", include_in_schema=False)
async def action_enable(ctx: Ctx, who: Operator, port: str) -> dict[str, Any]:
    """Let the slot take boards again."""
    return await _port_action(ctx, who, port, "enable")


async def _lot_action(ctx: ApiContext, who: Principal, lot: str, state: LotState) -> dict[str, Any]:
    if not LOT_NAME.fullmatch(lot):
        raise HTTPException(404, f"no lot named {lot!r}")
    verb = "pause" if state is LotState.PAUSED else "resume"
    await ctx.ledger.get_lot(lot)  # 404 before anything is written
    await _audit(ctx, who, f"lot.{verb}", lot)
    info = await ctx.ledger.set_lot_state(lot, state, actor=who.name)
    log.info("station page action", actor=who.name, action=verb, lot=lot)
    return {"ok": True, "lot": info.name, "state": info.state.value}


@router.post("/station/actions/lots/{lot}/pause", include_in_schema=False)
async def action_pause(ctx: Ctx, who: Operator, lot: str) -> dict[str, Any]:
    """Pause the lot: slots finish their current board and wait."""
    return await _lot_action(ctx, who, lot, LotState.PAUSED)


@router.post("/station/actions/lots/{lot}/resume", include_in_schema=False)
async def action_resume(ctx: Ctx, who: Operator, lot: str) -> dict[str, Any]:
    """Resume a paused lot."""
    return await _lot_action(ctx, who, lot, LotState.ACTIVE)
