"""The FastAPI application: routes, error mapping, audit middleware, token store life cycle."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.engine import make_url
from starlette.exceptions import HTTPException as StarletteHTTPException

from factoryd import __version__
from factoryd.api.audit import AuditMiddleware
from factoryd.api.context import ApiContext
from factoryd.api.errors import TokenExistsError, TokenNotFoundError, TokenRejectedError
from factoryd.api.limits import LoadLimitMiddleware, address_buckets
from factoryd.api.page.routes import router as station_page_router  # station page (issue 12)
from factoryd.api.routes import ManifestCache, router
from factoryd.api.tokens import TokenStore
from factoryd.errors import (
    ConfigError,
    FactorydError,
    InputError,
    LotNotFoundError,
    LotStateError,
    PkiError,
)
from factoryd.ledger import DeviceNotFoundError, LedgerUnavailableError, LotExistsError

log = structlog.get_logger(__name__)

# Validation problems spelled out in one error message; the rest are counted.
MAX_PROBLEMS_SHOWN = 3

# Most specific first: the first class an error is an instance of decides its status.
_STATUS: tuple[tuple[type[FactorydError], int], ...] = (
    (TokenRejectedError, 401),
    (TokenNotFoundError, 404),
    (TokenExistsError, 409),
    (LotExistsError, 409),
    (LotNotFoundError, 404),
    (DeviceNotFoundError, 404),
    (LotStateError, 409),
    (InputError, 422),  # IdListError, BundleError and every other refused input
    (LedgerUnavailableError, 503),
    (PkiError, 503),  # the CA key cannot be used now (station passphrase, token)
    (ConfigError, 503),
)


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so echoed client text can never fail to encode."""

    def render(self, content: Any) -> bytes:
        """Serialise ``content``."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def status_for(exc: FactorydError) -> int:
    """The HTTP status a factoryd error maps to (500 for errors that are the station's fault)."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def describe_validation(errors: Sequence[Any]) -> str:
    """One readable sentence for pydantic/FastAPI validation errors."""
    parts: list[str] = []
    for error in errors[:MAX_PROBLEMS_SHOWN]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            where = f" at character {loc[-1]}" if loc else ""
            parts.append(f"malformed JSON{where}: {reason}")
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    rest = len(errors) - MAX_PROBLEMS_SHOWN
    more = f" (and {rest} more)" if rest > 0 else ""
    return "invalid request: " + "; ".join(parts) + more


async def _factoryd_error(_request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, FactorydError):
        raise exc
    code = status_for(exc)
    if code >= 500:
        log.error("api request failed", error=str(exc), reason=exc.reason)
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    return SafeJSONResponse({"detail": str(exc)}, status_code=code, headers=headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    errors = list(exc.errors())
    # Only location, message and type go back: the input itself may be binary or huge.
    slim = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return SafeJSONResponse({"detail": describe_validation(errors), "errors": slim}, status_code=422)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(ctx: ApiContext) -> FastAPI:
    """The HTTP API of a station (serve it with :func:`factoryd.api.server.serve_api`)."""
    url = make_url(ctx.settings.ledger_url)
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigError("the HTTP API needs a file or PostgreSQL ledger, not an in-memory SQLite one")
    tokens = TokenStore.open(ctx.settings.ledger_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            tokens.close()

    app = FastAPI(
        title="factoryd",
        version=__version__,
        description="Station API: lots, ID lists, CA bundles, signed manifests, ports. See docs/api.md.",
        docs_url=None,  # Swagger UI loads scripts from a CDN; a factory network has none
        redoc_url=None,
        default_response_class=SafeJSONResponse,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.tokens = tokens
    app.state.manifests = ManifestCache()
    app.include_router(router)
    app.include_router(station_page_router)  # station page (factoryd/api/page/, issue 12)
    app.add_exception_handler(FactorydError, _factoryd_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(AuditMiddleware, ledger=ctx.ledger)
    # Outermost: a flood is refused before routing, token lookups and the audit trail.
    app.state.address_buckets = addresses = address_buckets(ctx.load)
    app.state.on_reject = ctx.on_reject
    app.add_middleware(LoadLimitMiddleware, limits=ctx.load, on_reject=ctx.on_reject, addresses=addresses)
    return app
