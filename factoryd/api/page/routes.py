"""The station page's routes: ``GET /station`` (login form or page), its assets, the event stream
and the operator actions (``POST /station/actions/...``).

Sessions and their checks live in :mod:`factoryd.api.page.sessions`, the live feed in
:mod:`factoryd.api.page.feed`. Every action is written to the audit trail before it takes effect.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import string
import time
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs

import structlog
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse

from factoryd.api.auth import OPERATE_ROLES, READ_ROLES, Principal, api_context, token_store
from factoryd.api.context import ApiContext
from factoryd.api.errors import TokenRejectedError
from factoryd.api.page.feed import event_stream
from factoryd.api.page.printing import router as printing_router
from factoryd.api.page.sessions import (
    SESSION_COOKIE,
    Operator,
    Reader,
    Writer,
    cookie_session,
    remember,
    remember_rejected,
    same_origin,
    session_signer,
)
from factoryd.api.routes import LOT_NAME
from factoryd.jobs.lots import check_activation
from factoryd.ledger import LotState

log = structlog.get_logger(__name__)

# A token is ~64 characters; the form body needs a few hundred bytes at most.
LOGIN_BODY_MAX_BYTES = 4096
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

Ctx = Annotated[ApiContext, Depends(api_context)]


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
    if not same_origin(request):
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
            remember_rejected(request, exc.name)
        return _login_page(ctx, "That token is not valid (unknown, expired or revoked).", 401)
    principal = Principal.of(info)
    remember(request, principal)
    if principal.role not in READ_ROLES:
        return _login_page(ctx, f"A {principal.role} token cannot open the station page.", 403)
    cookie, expires = session_signer(request).issue(info, time.time())
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
    info = await ctx.ledger.get_lot(lot)  # 404 before anything is written
    if state is LotState.ACTIVE:
        # The same check as `lots activate` and the API: a lot that cannot be provisioned stays paused.
        progress = await ctx.ledger.progress(info.name)
        await asyncio.to_thread(check_activation, info, progress, ctx.paths.bundles, ctx.paths.firmware)
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


# The label panel's routes (factoryd/api/page/printing.py): printers, queue, previews, reprints.
router.include_router(printing_router)
