"""Every API call goes into the ledger's audit trail, refused ones included.

Actor: the token's name (or ``(anonymous)``); action: method and route template
(``POST /lots/{lot}/ids``); subject: the lot, port or token the path names, else the route
(``/lots``); details: the status code and the client address. The entry is committed before
the response starts, so a client that saw an answer can rely on the trail having it. Liveness
and readiness probes and the OpenAPI document are not audited: they carry no data and are
polled all day long.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from factoryd.api.auth import ANONYMOUS, STATE_PRINCIPAL, STATE_REJECTED, Principal
from factoryd.errors import FactorydError
from factoryd.ledger import AsyncLedger

log = structlog.get_logger(__name__)

UNAUDITED_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
# Subjects longer than this are cut; the audit column holds 192 characters.
SUBJECT_MAX_CHARS = 128
NO_ROUTE = "(no route)"
_METHOD = re.compile(r"[A-Z]{1,16}")
_SUBJECT_PARAMS = ("lot", "port", "name")


def _printable(value: str, max_chars: int) -> str:
    if not value.isprintable():
        value = ascii(value)[1:-1]
    return value[:max_chars]


def audit_entry(scope: Scope, status: int) -> tuple[str, str, str, dict[str, object]]:
    """(actor, action, subject, details) for one call."""
    state: dict[str, Any] = scope.get("state") or {}
    principal = state.get(STATE_PRINCIPAL)
    actor = principal.name if isinstance(principal, Principal) else state.get(STATE_REJECTED) or ANONYMOUS
    method = scope.get("method", "")
    method = method if _METHOD.fullmatch(method) else "OTHER"
    route = scope.get("route")
    template = getattr(route, "path", None)
    action = f"{method} {template}" if isinstance(template, str) else f"{method} {NO_ROUTE}"
    params: dict[str, Any] = scope.get("path_params") or {}
    named = next((str(params[key]) for key in _SUBJECT_PARAMS if key in params), "")
    # The ledger wants a subject: the lot, port or token named in the path, else the collection.
    subject = named or (template if isinstance(template, str) else NO_ROUTE)
    client = scope.get("client")
    details: dict[str, object] = {"status": status, "client": client[0] if client else None}
    return actor, action[:64], _printable(subject, SUBJECT_MAX_CHARS), details


class AuditMiddleware:
    """Pure ASGI middleware writing one audit entry per HTTP call."""

    def __init__(self, app: ASGIApp, ledger: AsyncLedger) -> None:
        self.app = app
        self.ledger = ledger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the call, auditing it as its response starts (or as 500 if it raises)."""
        if scope["type"] != "http" or scope.get("path") in UNAUDITED_PATHS:
            await self.app(scope, receive, send)
            return
        started = False

        async def audited_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                await self._audit(scope, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except Exception:
            if not started:
                await self._audit(scope, 500)
            raise

    async def _audit(self, scope: Scope, status: int) -> None:
        actor, action, subject, details = audit_entry(scope, status)
        try:
            await self.ledger.audit(actor=actor, action=action, subject=subject, details=details)
        except FactorydError as exc:
            # The call's own ledger change (if any) is already committed with its own audit entry;
            # failing the response now would only make the client retry it.
            log.error("api call could not be audited", action=action, status=status, error=str(exc))
