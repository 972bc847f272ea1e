"""The station page's label panel: printers and queue, a PNG preview of each label, reprints.

``GET /station/labels`` is what the panel polls: each printer as the queue sees it (ready, or its
condition and since when), how many labels wait, the newest label jobs. ``GET
/station/labels/{id}/preview.png`` draws a job's label from the ZPL the printer gets (made again
from the ledger, codes opened from their sealed form; never cached, never stored). ``POST
/station/actions/labels/{id}/reprint`` and ``POST /station/actions/labels/reprint`` (a device ID)
queue a reprint, audited in the ledger with the operator's name. (:mod:`factoryd.api.page.labels`
is something else: the sentences of pipeline steps.)
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Body, Depends, HTTPException, Response

from factoryd.api.auth import api_context
from factoryd.api.context import ApiContext
from factoryd.api.page.sessions import Operator, Reader
from factoryd.errors import FactorydError, InputError, LedgerError
from factoryd.labels.errors import LabelError
from factoryd.labels.preview import render_png
from factoryd.labels.queue import LabelQueue, make_label
from factoryd.ledger.errors import DeviceNotFoundError, DeviceStateError, JobNotFoundError
from factoryd.ledger.labels import LabelJob

log = structlog.get_logger(__name__)

Ctx = Annotated[ApiContext, Depends(api_context)]
# Label jobs the panel lists (newest first).
JOBS_SHOWN = 20
DEVICE_ID_MAX_CHARS = 128

router = APIRouter(tags=["station page"])


def _queue(ctx: ApiContext) -> LabelQueue:
    station = ctx.station
    labels = station.labels if station is not None else None
    if labels is None:
        raise HTTPException(404, "labels are not enabled on this station ([labels] enabled = false)")
    return labels


def _job_view(job: LabelJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "device_id": job.device_id,
        "lot": job.lot,
        "port": job.port,
        "kind": job.kind.value,
        "state": job.state.value,
        "attempts": job.attempts,
        "condition": job.condition,
        "error": job.last_error,
        "requested_by": job.requested_by,
        "updated_at": job.updated_at.isoformat(),
    }


@router.get("/station/labels", include_in_schema=False)
async def labels_panel(ctx: Ctx, who: Reader) -> dict[str, Any]:
    """Printers, the queue and the newest label jobs of this station."""
    station = ctx.station
    queue = station.labels if station is not None else None
    if queue is None:
        return {"enabled": False, "queued": 0, "printers": [], "jobs": []}
    jobs = await ctx.ledger.label_jobs(station=ctx.settings.station.name, limit=JOBS_SHOWN)
    printers = [
        {
            "address": view.address,
            "ports": view.ports,
            "ready": view.ready,
            "condition": view.condition,
            "message": view.message,
            "since": view.since.isoformat() if view.since else None,
            "retry_in_s": view.retry_in_s,
            "printed": view.printed,
        }
        for view in queue.printers
    ]
    return {
        "enabled": True,
        "queued": queue.queued,
        "printers": printers,
        "jobs": [_job_view(j) for j in jobs],
    }


@router.get("/station/labels/{job_id}/preview.png", include_in_schema=False)
async def label_preview(ctx: Ctx, who: Reader, job_id: int) -> Response:
    """The label of one job as PNG, drawn from the ZPL bytes the printer gets."""
    queue = _queue(ctx)
    try:
        job = await ctx.ledger.label_job(job_id)
    except JobNotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    if job.station != ctx.settings.station.name:
        raise HTTPException(404, f"label job {job_id} belongs to station {job.station}")
    try:
        png = await asyncio.to_thread(_png, ctx, queue, job)
    except LabelError as exc:
        raise HTTPException(422, str(exc)) from None
    except LedgerError as exc:
        raise HTTPException(503, str(exc)) from None
    # A Matter label shows the setup passcode: never cached by the browser or a proxy.
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def _png(ctx: ApiContext, queue: LabelQueue, job: LabelJob) -> bytes:
    zpl = make_label(ctx.ledger.sync, job.lot, job.device_id, queue.settings.default_template)
    return render_png(zpl)


@router.post("/station/actions/labels/{job_id}/reprint", include_in_schema=False)
async def action_reprint_job(ctx: Ctx, who: Operator, job_id: int) -> dict[str, Any]:
    """Print the label of a listed job again, on the same port's printer (audited)."""
    queue = _queue(ctx)
    try:
        job = await ctx.ledger.label_job(job_id)
    except JobNotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    return await _reprint(queue, who.name, job.lot, job.device_id, job.port)


@router.post("/station/actions/labels/reprint", include_in_schema=False)
async def action_reprint_device(
    ctx: Ctx,
    who: Operator,
    device_id: Annotated[str, Body(embed=True, min_length=1, max_length=DEVICE_ID_MAX_CHARS)],
    port: Annotated[str | None, Body(embed=True, max_length=64)] = None,
) -> dict[str, Any]:
    """Reprint a provisioned device's label by its ID, on its port's printer or ``port``'s (audited)."""
    queue = _queue(ctx)
    record = await ctx.ledger.find_device(device_id)
    if record is None:
        raise HTTPException(404, f"no device {device_id!r}")
    where = port or record.port
    if where is None:
        raise HTTPException(422, f"device {device_id!r} has no port on record: give a port")
    return await _reprint(queue, who.name, record.lot, device_id, where)


async def _reprint(queue: LabelQueue, actor: str, lot: str, device_id: str, port: str) -> dict[str, Any]:
    try:
        job = await queue.reprint(lot, device_id, port, actor=actor)
    except DeviceNotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
    except (DeviceStateError, InputError) as exc:
        raise HTTPException(422, str(exc)) from None
    except FactorydError as exc:
        raise HTTPException(503, str(exc)) from None
    log.info("station page action", actor=actor, action="label.reprint", device_id=device_id, port=port)
    return {"ok": True, "job": _job_view(job)}
