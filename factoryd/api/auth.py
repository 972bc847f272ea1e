"""Who is calling and may they: bearer tokens, roles, content types and body limits per route.

Every guarded route runs the same checks, in this order, before FastAPI reads the body:
401 (no, malformed, unknown, expired or revoked token), 403 (role), 415 (content type),
413 (declared ``Content-Length`` over the limit). While the body is read, a counter refuses
it with 413 the moment it passes the limit, so nothing is buffered beyond it.
"""

from __future__ import annotations

import asyncio
import email.message
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import HTTPException, Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Message

from factoryd.api.context import ApiContext
from factoryd.api.errors import TokenRejectedError
from factoryd.api.tokens import Role, TokenInfo, TokenStore
from factoryd.firmware import SIGNING_KEY_MAX_BYTES

Body = Literal["none", "json", "ids", "bundle", "firmware"]
_F = TypeVar("_F", bound=Callable[..., Any])
_GUARD_ATTR = "__factoryd_guard__"
STATE_PRINCIPAL = "factoryd_principal"
STATE_REJECTED = "factoryd_rejected_token"
ANONYMOUS = "(anonymous)"

# Only documents the scheme in the OpenAPI spec; the guard does the checking.
bearer_scheme = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer fdt_...`")

READ_ROLES = frozenset({Role.SUPERVISOR, Role.OPERATOR, Role.ADMIN})
LOT_READ_ROLES = READ_ROLES | {Role.CUSTOMER}
LOT_UPLOAD_ROLES = frozenset({Role.CUSTOMER, Role.OPERATOR, Role.ADMIN})
OPERATE_ROLES = frozenset({Role.OPERATOR, Role.ADMIN})
ADMIN_ROLES = frozenset({Role.ADMIN})


@dataclass(frozen=True)
class Guard:
    """What a route requires of a caller and of the request body."""

    roles: frozenset[Role]
    body: Body = "none"


def guarded(roles: frozenset[Role], body: Body = "none") -> Callable[[_F], _F]:
    """Mark an endpoint: callers need one of ``roles``; ``body`` names its content type and limit."""

    def mark(fn: _F) -> _F:
        setattr(fn, _GUARD_ATTR, Guard(roles, body))
        return fn

    return mark


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    name: str
    role: Role
    customer: str | None

    @classmethod
    def of(cls, token: TokenInfo) -> Principal:
        """The principal a token stands for."""
        return cls(token.name, token.role, token.customer)


def api_context(request: Request) -> ApiContext:
    """The ApiContext of the app serving ``request``."""
    ctx: ApiContext = request.app.state.ctx
    return ctx


def token_store(request: Request) -> TokenStore:
    """The token store of the app serving ``request``."""
    store: TokenStore = request.app.state.tokens
    return store


def current_principal(
    request: Request,
    _credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),  # noqa: B008
) -> Principal:
    """The caller the guard authenticated (dependency of every guarded route)."""
    principal = request.scope.get("state", {}).get(STATE_PRINCIPAL)
    if not isinstance(principal, Principal):
        raise HTTPException(500, "route is not guarded")  # a programming error, not a client one
    return principal


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


async def authenticate(request: Request) -> Principal:
    """Check the bearer token; 401 names what is wrong (without telling which tokens exist)."""
    header = request.headers.get("authorization")
    if header is None:
        raise _unauthorized("missing API token: send 'Authorization: Bearer <token>'")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    try:
        token = await asyncio.to_thread(token_store(request).authenticate, value.strip())
    except TokenRejectedError as exc:
        if exc.name is not None:
            request.scope.setdefault("state", {})[STATE_REJECTED] = exc.name
        raise _unauthorized(str(exc)) from None
    principal = Principal.of(token)
    request.scope.setdefault("state", {})[STATE_PRINCIPAL] = principal
    return principal


def _media_type(request: Request) -> str | None:
    value = request.headers.get("content-type")
    if value is None:
        return None
    message = email.message.Message()
    message["content-type"] = value
    return message.get_content_type()


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length.strip() != "0")


def _check_content_type(request: Request, body: Body) -> None:
    media = _media_type(request)
    if body == "json":
        if media is None and not _has_body(request):
            return  # FastAPI answers 422 "Field required" for the missing body
        if media != "application/json" and not (media or "").endswith("+json"):
            raise HTTPException(
                415, f"this endpoint takes application/json, not {media or 'an untyped body'}"
            )
    elif body in ("ids", "bundle", "firmware") and media != "multipart/form-data":
        raise HTTPException(415, f"this endpoint takes multipart/form-data, not {media or 'an untyped body'}")


def body_limit(ctx: ApiContext, body: Body) -> int:
    """The most bytes a request body of this kind may have."""
    limits = ctx.limits
    if body == "ids":
        return limits.id_list_bytes + limits.overhead_bytes
    if body == "bundle":
        return 3 * limits.bundle_file_bytes + limits.overhead_bytes
    if body == "firmware":  # the image and its signing key (a few hundred bytes of PEM)
        return limits.firmware_image_bytes + SIGNING_KEY_MAX_BYTES + limits.overhead_bytes
    if body == "json":
        return limits.json_bytes
    return limits.overhead_bytes


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"request body is over the limit of {limit} bytes; nothing was stored")


def _capped(request: Request, limit: int) -> Request:
    """A request whose body reads fail with 413 past ``limit`` bytes (checked as it streams)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HTTPException(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise _too_large(limit)
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
        return message

    return Request(request.scope, receive)


class GuardedRoute(APIRoute):
    """An APIRoute that authenticates, authorises and bounds the body before the endpoint runs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler with the route's guard (routes without one stay public)."""
        handler = super().get_route_handler()
        guard: Guard | None = getattr(self.endpoint, _GUARD_ATTR, None)
        if guard is None:
            return handler
        method_path = f"{'/'.join(sorted(self.methods or ()))} {self.path}"

        async def guarded_handler(request: Request) -> Response:
            principal = await authenticate(request)
            if principal.role not in guard.roles:
                allowed = ", ".join(sorted(guard.roles))
                raise HTTPException(
                    403, f"a {principal.role} token may not call {method_path} (needs {allowed})"
                )
            _check_content_type(request, guard.body)
            return await handler(_capped(request, body_limit(api_context(request), guard.body)))

        return guarded_handler
