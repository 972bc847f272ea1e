"""Station page sessions: signed cookies, CSRF tokens and the reader/writer/operator dependencies.

The login form takes an API token once (POST, never in a URL) and answers with an HttpOnly,
SameSite=Strict cookie signed with the station's page key (32 random bytes in the state
directory, 0600) so a daemon restart keeps the page logged in. The cookie names the token; every
use re-checks that token (revoked, expired, role) in the token store. Page actions need an operator
or admin session plus a CSRF token derived from the cookie (double-submit, sent as a header) and a
same-origin ``Origin``. A bearer token works too (no CSRF needed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request

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
from factoryd.api.errors import TokenNotFoundError
from factoryd.api.tokens import TokenInfo
from factoryd.errors import ConfigError
from factoryd.files import write_private

SESSION_COOKIE = "factoryd_station"
CSRF_HEADER = "X-Factoryd-CSRF"
# One shift plus margin: an operator logs in once per shift, not every hour.
SESSION_TTL_S = 12 * 3600
PAGE_KEY_FILE = "station-page.key"
PAGE_KEY_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_page_key(state_dir: Path) -> bytes:
    """The station's page key (created 0600 on first use); signs session cookies and CSRF tokens."""
    path = state_dir / PAGE_KEY_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            write_private(path, secrets.token_bytes(PAGE_KEY_BYTES), replace=False)
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


def session_signer(request: Request) -> SessionSigner:
    """The app's signer, made from the page key on first use."""
    signer: SessionSigner | None = getattr(request.app.state, "station_page_signer", None)
    if signer is None:
        signer = SessionSigner(load_page_key(api_context(request).paths.state_dir))
        request.app.state.station_page_signer = signer
    return signer


def remember(request: Request, principal: Principal) -> None:
    """Name the caller for the audit middleware."""
    request.scope.setdefault("state", {})[STATE_PRINCIPAL] = principal


def remember_rejected(request: Request, name: str) -> None:
    """Name a refused token for the audit middleware."""
    request.scope.setdefault("state", {})[STATE_REJECTED] = name


def _live_token(info: TokenInfo, token_id: int) -> bool:
    if info.id != token_id or info.revoked_at is not None or info.role not in READ_ROLES:
        return False
    return info.expires_at is None or info.expires_at > datetime.now(UTC)


async def cookie_session(request: Request) -> PageSession | None:
    """The page session of the request's cookie, if it is genuine and its token still valid."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or not cookie.isascii():
        return None
    signer = session_signer(request)
    checked = signer.check(cookie, time.time())
    if checked is None:
        return None
    token_id, name, expires = checked
    try:
        info = await asyncio.to_thread(token_store(request).get, name)
    except TokenNotFoundError:
        return None
    if not _live_token(info, token_id):
        remember_rejected(request, name)
        return None
    principal = Principal.of(info)
    remember(request, principal)
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


def same_origin(request: Request) -> bool:
    """Whether the request's ``Origin`` (if any) is this server's own."""
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
        if not same_origin(request):
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
