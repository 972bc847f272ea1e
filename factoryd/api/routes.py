"""The API's endpoints: lots, uploads, manifests, ports, status, tokens, health."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel

from factoryd import __version__
from factoryd.api.auth import (
    ADMIN_ROLES,
    LOT_READ_ROLES,
    LOT_UPLOAD_ROLES,
    OPERATE_ROLES,
    READ_ROLES,
    GuardedRoute,
    Principal,
    api_context,
    current_principal,
    guarded,
    token_store,
)
from factoryd.api.context import ApiContext
from factoryd.api.models import (
    BundleOut,
    ErrorOut,
    FirmwareOut,
    FirmwareUploadOut,
    HealthOut,
    ImportOut,
    LotCreate,
    LotOut,
    PortOut,
    ProgressOut,
    StatusOut,
    TokenCreate,
    TokenCreated,
    TokenOut,
)
from factoryd.api.tokens import Role, TokenStore
from factoryd.api.uploads import read_upload
from factoryd.cloud.exports import build_export, lot_ca_chain
from factoryd.cloud.formats import ExportFormat
from factoryd.errors import FactorydError, InputError, LotNotFoundError, LotStateError
from factoryd.firmware import SIGNING_KEY_MAX_BYTES, FirmwareStore, store_lot_firmware
from factoryd.jobs.lots import check_activation
from factoryd.jobs.scheduler import Station
from factoryd.ledger import LotInfo, LotState
from factoryd.pki.attestation import AttestationRootStore, load_attestation_roots
from factoryd.pki.manifest import SignedManifest
from factoryd.pki.store import BundleStore
from factoryd.service import ca_verification, export_manifest, parse_bundle, store_bundle

# The ledger's rule for lot names (factoryd.ledger.lots refuses anything else at creation).
LOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Readiness must answer quickly even when the database hangs.
READY_TIMEOUT_S = 2.0

Ctx = Annotated[ApiContext, Depends(api_context)]
Who = Annotated[Principal, Depends(current_principal)]
Tokens = Annotated[TokenStore, Depends(token_store)]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in (401, 403, *codes)}


router = APIRouter(route_class=GuardedRoute)


# Helpers ------------------------------------------------------------------------------------------


async def visible_lot(ctx: ApiContext, who: Principal, name: str) -> LotInfo:
    """The lot ``name`` if the caller may see it; another customer's lot is 'not found' too."""
    if not LOT_NAME.fullmatch(name):
        # Cannot name a lot (NUL, '/', 4 KiB of junk): answered without a database round trip.
        raise LotNotFoundError(f"no lot named {name!r}")
    info = await ctx.ledger.get_lot(name)
    if who.role is Role.CUSTOMER and info.customer != who.customer:
        raise LotNotFoundError(f"no lot named {name!r}")
    return info


def _station(ctx: ApiContext) -> Station:
    if ctx.station is None:
        raise HTTPException(503, "no station is running in this process")
    return ctx.station


class ManifestCache:
    """One signed manifest per lot, reused while the lot's provisioned set is unchanged.

    The JSON and its detached signature are separate downloads and must match, so both come
    from the same cached build. (provisioned, void) identifies the provisioned set: void only
    grows, so any change to the set changes one of the two counts; the revoked certificates
    (serial and cause) are part of the key too, since a failed job adds one without changing them.
    """

    def __init__(self) -> None:
        """An empty cache."""
        self._entries: dict[str, tuple[tuple[object, ...], SignedManifest]] = {}
        self._lock = asyncio.Lock()

    async def get(self, ctx: ApiContext, lot: str) -> SignedManifest:
        """The signed manifest of ``lot`` as of now (rebuilt only when its devices changed)."""
        async with self._lock:
            progress = await ctx.ledger.progress(lot)
            revoked = await ctx.ledger.revoked_certificates(lot)
            key = (progress.provisioned, progress.void, tuple((r.cert_serial, r.cause) for r in revoked))
            cached = self._entries.get(lot)
            if cached is not None and cached[0] == key:
                return cached[1]
            if not BundleStore(ctx.paths.bundles, ctx.passphrase).exists(lot):
                raise LotStateError(f"lot {lot!r} has no CA bundle yet; upload one before its manifest")
            manifest = await asyncio.to_thread(
                export_manifest, ctx.ledger.sync, ctx.paths, ctx.passphrase, lot
            )
            self._entries[lot] = (key, manifest)
            return manifest


def _manifests(request: Request) -> ManifestCache:
    cache: ManifestCache = request.app.state.manifests
    return cache


# Health -------------------------------------------------------------------------------------------


@router.get("/healthz", tags=["health"])
async def healthz() -> HealthOut:
    """Liveness: the process answers HTTP."""
    return HealthOut(status="ok")


@router.get("/readyz", tags=["health"], responses={503: {"model": HealthOut}})
async def readyz(ctx: Ctx, response: Response) -> HealthOut:
    """Readiness: the ledger answers and the station is running."""
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await ctx.ledger.list_lots()
        checks["ledger"] = "ok"
    except (FactorydError, TimeoutError) as exc:
        checks["ledger"] = f"unreachable: {exc or 'timed out'}"
    if ctx.station is None:
        checks["station"] = "not running in this process"
    elif ctx.station.stopping:
        checks["station"] = "stopping"
    else:
        checks["station"] = "running"
    ready = checks["ledger"] == "ok" and checks["station"] == "running"
    if not ready:
        response.status_code = 503
    return HealthOut(status="ready" if ready else "not ready", checks=checks)


# Lots ---------------------------------------------------------------------------------------------


@router.get("/lots", tags=["lots"], responses=_errors())
@guarded(LOT_READ_ROLES)
async def list_lots(ctx: Ctx, who: Who) -> list[LotOut]:
    """Every lot the caller may see (a customer sees its own)."""
    lots = await ctx.ledger.list_lots()
    return [LotOut.of(i) for i in lots if who.role is not Role.CUSTOMER or i.customer == who.customer]


@router.post("/lots", tags=["lots"], status_code=201, responses=_errors(409, 413, 415, 422))
@guarded(OPERATE_ROLES, body="json")
async def create_lot(ctx: Ctx, who: Who, body: LotCreate) -> LotOut:
    """Create a lot in state draft."""
    info = await ctx.ledger.create_lot(
        body.name,
        customer=body.customer,
        profile=body.profile,
        target_quantity=body.target_quantity,
        actor=who.name,
    )
    return LotOut.of(info)


@router.get("/lots/{lot}", tags=["lots"], responses=_errors(404))
@guarded(LOT_READ_ROLES)
async def get_lot(ctx: Ctx, who: Who, lot: str) -> LotOut:
    """One lot."""
    return LotOut.of(await visible_lot(ctx, who, lot))


@router.get("/lots/{lot}/progress", tags=["lots"], responses=_errors(404))
@guarded(LOT_READ_ROLES)
async def lot_progress(ctx: Ctx, who: Who, lot: str) -> ProgressOut:
    """How many of the lot's IDs are available, reserved, provisioned and void."""
    info = await visible_lot(ctx, who, lot)
    return ProgressOut.of(info, await ctx.ledger.progress(info.name))


async def _set_state(ctx: ApiContext, who: Principal, lot: str, state: LotState) -> LotOut:
    info = await visible_lot(ctx, who, lot)
    return LotOut.of(await ctx.ledger.set_lot_state(info.name, state, actor=who.name))


@router.post("/lots/{lot}/activate", tags=["lots"], responses=_errors(404, 409))
@guarded(OPERATE_ROLES)
async def activate_lot(ctx: Ctx, who: Who, lot: str) -> LotOut:
    """Start (or resume) provisioning the lot; 409 naming everything it lacks (IDs, bundle, firmware)."""
    info = await visible_lot(ctx, who, lot)
    progress = await ctx.ledger.progress(info.name)
    await asyncio.to_thread(check_activation, info, progress, ctx.paths.bundles, ctx.paths.firmware)
    return await _set_state(ctx, who, lot, LotState.ACTIVE)


@router.post("/lots/{lot}/pause", tags=["lots"], responses=_errors(404, 409))
@guarded(OPERATE_ROLES)
async def pause_lot(ctx: Ctx, who: Who, lot: str) -> LotOut:
    """Pause the lot: ports finish their current board and wait."""
    return await _set_state(ctx, who, lot, LotState.PAUSED)


@router.post("/lots/{lot}/close", tags=["lots"], responses=_errors(404, 409))
@guarded(OPERATE_ROLES)
async def close_lot(ctx: Ctx, who: Who, lot: str) -> LotOut:
    """Close the lot for good."""
    return await _set_state(ctx, who, lot, LotState.CLOSED)


_IDS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["ids"],
                    "properties": {
                        "ids": {
                            "type": "string",
                            "format": "binary",
                            "description": "The ID list (CSV, JSON or text); its file name picks the format",
                        },
                        "format": {"type": "string", "enum": ["csv", "json", "txt"]},
                    },
                }
            }
        },
    }
}


@router.post(
    "/lots/{lot}/ids",
    tags=["lots"],
    responses=_errors(400, 404, 409, 413, 415, 422),
    openapi_extra=_IDS_BODY,
)
@guarded(LOT_UPLOAD_ROLES, body="ids")
async def upload_ids(ctx: Ctx, who: Who, lot: str, request: Request) -> ImportOut:
    """Import the lot's ID list, whole or not at all."""
    info = await visible_lot(ctx, who, lot)
    upload = await read_upload(
        request,
        files={"ids": ctx.limits.id_list_bytes},
        fields=frozenset({"format"}),
        required=frozenset({"ids"}),
    )
    ids = upload.files["ids"]
    count = await ctx.ledger.import_ids(
        info.name,
        ids.data,
        filename=ids.filename,
        fmt=upload.fields.get("format"),
        actor=who.name,
        max_bytes=ctx.limits.id_list_bytes,
    )
    return ImportOut(lot=info.name, imported=count)


_BUNDLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["bundle", "passphrase"],
                    "properties": {
                        "bundle": {
                            "type": "string",
                            "format": "binary",
                            "description": "PKCS#12 file, or the PEM chain (CA certificate up to the root)",
                        },
                        "key": {
                            "type": "string",
                            "format": "binary",
                            "description": "Encrypted PKCS#8 PEM key (PEM bundles only)",
                        },
                        "anchors": {
                            "type": "string",
                            "format": "binary",
                            "description": "Trust anchors to install on the devices (PEM, optional)",
                        },
                        "passphrase": {"type": "string", "description": "The bundle's passphrase"},
                    },
                }
            }
        },
    }
}


@router.post(
    "/lots/{lot}/bundle",
    tags=["lots"],
    responses=_errors(400, 404, 413, 415, 422),
    openapi_extra=_BUNDLE_BODY,
)
@guarded(LOT_UPLOAD_ROLES, body="bundle")
async def upload_bundle(ctx: Ctx, who: Who, lot: str, request: Request) -> BundleOut:
    """Validate the lot's CA bundle and store it encrypted under the station passphrase."""
    info = await visible_lot(ctx, who, lot)
    limit = ctx.limits.bundle_file_bytes
    upload = await read_upload(
        request,
        files={"bundle": limit, "key": limit, "anchors": limit},
        fields=frozenset({"passphrase"}),
        required=frozenset({"bundle", "passphrase"}),
    )
    key = upload.files.get("key")
    anchors = upload.files.get("anchors")
    bundle = await asyncio.to_thread(
        parse_bundle,
        upload.files["bundle"].data,
        upload.fields["passphrase"].encode("utf-8"),
        info,
        key_pem=key.data if key else None,
        trust_anchors=anchors.data if anchors else None,
    )
    await asyncio.to_thread(store_bundle, ctx.paths, ctx.passphrase, info.name, bundle)
    subject = bundle.certificate.subject.rfc4514_string()
    await ctx.ledger.audit(
        actor=who.name, action="lot.bundle_stored", subject=info.name, details={"ca_subject": subject}
    )
    return BundleOut(
        lot=info.name,
        ca_subject=subject,
        chain_length=len(bundle.chain),
        trust_anchors=len(bundle.trust_anchors),
    )


class AttestationRootsOut(BaseModel):
    """Result of an attestation-roots upload: the roots the lot now trusts."""

    lot: str
    roots: list[str]


@router.post(
    "/lots/{lot}/attestation-roots",
    tags=["lots"],
    responses=_errors(400, 404, 413, 415, 422),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["roots"],
                        "properties": {
                            "roots": {
                                "type": "string",
                                "format": "binary",
                                "description": "PEM file of the secure-element vendor's attestation CA(s)",
                            }
                        },
                    }
                }
            },
        }
    },
)
@guarded(LOT_UPLOAD_ROLES, body="bundle")
async def upload_attestation_roots(ctx: Ctx, who: Who, lot: str, request: Request) -> AttestationRootsOut:
    """Validate the lot's attestation roots (CA flags, validity, key types) and store them; refused whole."""
    info = await visible_lot(ctx, who, lot)
    limit = ctx.limits.bundle_file_bytes
    wanted = frozenset({"roots"})
    upload = await read_upload(request, files={"roots": limit}, fields=frozenset(), required=wanted)
    roots = await asyncio.to_thread(load_attestation_roots, upload.files["roots"].data)
    await asyncio.to_thread(AttestationRootStore(ctx.paths.attestation).save, info.name, roots)
    subjects = [r.subject.rfc4514_string() for r in roots]
    await ctx.ledger.audit(
        actor=who.name, action="lot.attestation_roots", subject=info.name, details={"roots": subjects}
    )
    return AttestationRootsOut(lot=info.name, roots=subjects)


# The lot's owner gives its firmware, the station's admin may too; operators flash what they are given.
FIRMWARE_UPLOAD_ROLES = frozenset({Role.ADMIN, Role.CUSTOMER})
_FIRMWARE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "signing_key"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "The signed MCUboot image (imgtool sign output)",
                        },
                        "signing_key": {
                            "type": "string",
                            "format": "binary",
                            "description": "The firmware-signing public key (PEM)",
                        },
                        "replace_signing_key": {
                            "type": "string",
                            "enum": ["true", "false"],
                            "description": "Make this key the lot's firmware-signing key (admin only)",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "/lots/{lot}/firmware",
    tags=["lots"],
    responses=_errors(400, 404, 409, 413, 415, 422),
    openapi_extra=_FIRMWARE_BODY,
)
@guarded(FIRMWARE_UPLOAD_ROLES, body="firmware")
async def upload_firmware(ctx: Ctx, who: Who, lot: str, request: Request) -> FirmwareUploadOut:
    """Verify an MCUboot image completely and make it the lot's firmware; refused whole otherwise."""
    info = await visible_lot(ctx, who, lot)
    upload = await read_upload(
        request,
        files={"image": ctx.limits.firmware_image_bytes, "signing_key": SIGNING_KEY_MAX_BYTES},
        fields=frozenset({"replace_signing_key"}),
        required=frozenset({"image", "signing_key"}),
    )
    replace = upload.fields.get("replace_signing_key", "false")
    if replace not in ("true", "false"):
        raise InputError(f"replace_signing_key must be 'true' or 'false', not {replace!r}")
    if replace == "true" and who.role is not Role.ADMIN:
        raise HTTPException(403, "only an admin may replace a lot's firmware-signing key")
    stored = await asyncio.to_thread(
        store_lot_firmware,
        ctx.ledger.sync,
        FirmwareStore(ctx.paths.firmware),
        info.name,
        upload.files["image"].data,
        upload.files["signing_key"].data,
        actor=who.name,
        replace_signing_key=replace == "true",
    )
    image = stored.firmware.image
    shown = FirmwareOut(
        sha256=image.hash,
        version=image.version,
        security_counter=image.security_counter,
        signing_key_hash=image.key_hash,
    )
    return FirmwareUploadOut(lot=info.name, firmware=shown, signing_key_replaced=stored.signing_key_replaced)


@router.get(
    "/lots/{lot}/manifest",
    tags=["lots"],
    responses={**_errors(404, 409), 200: {"content": {"application/json": {}}}},
    response_class=Response,
)
@guarded(LOT_READ_ROLES)
async def manifest_json(ctx: Ctx, who: Who, lot: str, request: Request) -> Response:
    """The lot's manifest: canonical JSON of every provisioned device (signature: manifest.p7s)."""
    info = await visible_lot(ctx, who, lot)
    manifest = await _manifests(request).get(ctx, info.name)
    return Response(
        manifest.json_bytes,
        media_type="application/json",
        headers={
            "X-Manifest-SHA256": manifest.sha256,
            "Content-Disposition": f'attachment; filename="{info.name}.manifest.json"',
        },
    )


@router.get(
    "/lots/{lot}/manifest.p7s",
    tags=["lots"],
    responses={**_errors(404, 409), 200: {"content": {"application/pkcs7-signature": {}}}},
    response_class=Response,
)
@guarded(LOT_READ_ROLES)
async def manifest_signature(ctx: Ctx, who: Who, lot: str, request: Request) -> Response:
    """The detached CMS signature (DER) over the bytes of GET /lots/{lot}/manifest."""
    info = await visible_lot(ctx, who, lot)
    manifest = await _manifests(request).get(ctx, info.name)
    return Response(
        manifest.signature_der,
        media_type="application/pkcs7-signature",
        headers={
            "X-Manifest-SHA256": manifest.sha256,
            "Content-Disposition": f'attachment; filename="{info.name}.manifest.p7s"',
        },
    )


# The onboarding codes hold every device's passcode: the lot's owner and the admin only.
ONBOARDING_CODES_ROLES = frozenset({Role.ADMIN, Role.CUSTOMER})


@router.get(
    "/lots/{lot}/onboarding-codes.p7m",
    tags=["lots"],
    responses={**_errors(404, 409, 422), 200: {"content": {"application/pkcs7-mime": {}}}},
    response_class=Response,
)
@guarded(ONBOARDING_CODES_ROLES)
async def onboarding_codes_file(ctx: Ctx, who: Who, lot: str) -> Response:
    """A Matter lot's onboarding codes (CSV) as CMS EnvelopedData (DER) for the stored customer cert."""
    from factoryd.matter.admin import export_onboarding_codes  # noqa: PLC0415 - Matter lots only

    info = await visible_lot(ctx, who, lot)
    export = await asyncio.to_thread(
        export_onboarding_codes, ctx.ledger.sync, ctx.paths, ctx.passphrase, info.name, actor=who.name
    )
    return Response(
        export.der,
        media_type="application/pkcs7-mime",
        headers={
            "X-Devices": str(export.count),
            "Content-Disposition": f'attachment; filename="{info.name}.onboarding-codes.p7m"',
        },
    )


# The lot's owner and the station's admin; operators and supervisors never make the CA key sign.
CA_VERIFICATION_ROLES = frozenset({Role.ADMIN, Role.CUSTOMER})


@router.post(
    "/lots/{lot}/ca-verification",
    tags=["lots"],
    responses={**_errors(404, 409, 422), 200: {"content": {"application/x-pem-file": {}}}},
    response_class=Response,
)
@guarded(CA_VERIFICATION_ROLES)
async def lot_ca_verification(ctx: Ctx, who: Who, lot: str, code: str) -> Response:
    """A verification certificate (PEM, CN=code) signed by the lot's CA key, for AWS IoT or Azure DPS."""
    info = await visible_lot(ctx, who, lot)
    if not BundleStore(ctx.paths.bundles, ctx.passphrase).exists(info.name):
        raise LotStateError(f"lot {info.name!r} has no CA bundle yet; upload one first")
    verification = await asyncio.to_thread(
        ca_verification, ctx.ledger.sync, ctx.paths, ctx.passphrase, info.name, code, actor=who.name
    )
    return Response(
        verification.pem,
        media_type="application/x-pem-file",
        headers={"Content-Disposition": f'attachment; filename="{info.name}.verification.pem"'},
    )


@router.get(
    "/lots/{lot}/export",
    tags=["lots"],
    responses={
        **_errors(404, 409, 422),
        200: {
            "content": {
                "application/json": {},
                "text/csv": {},
                "application/x-ndjson": {},
                "application/zip": {},
            }
        },
    },
    response_class=Response,
)
@guarded(LOT_READ_ROLES)
async def lot_export(
    ctx: Ctx,
    who: Who,
    lot: str,
    request: Request,
    fmt: Annotated[ExportFormat, Query(alias="format")] = ExportFormat.JSON,
) -> Response:
    """The lot's provisioned devices in a cloud's format (docs/clouds.md); several files come as a zip.

    ``json`` is the signed manifest (its signature: manifest.p7s); ``csv``, ``aws-bulk``,
    ``nrfcloud`` (onboarding CSVs of at most 1,000 rows, zipped) and ``azure-dps`` (the CA chain,
    an enrollment-group body and the registration IDs, zipped). 422 names the devices a cloud
    would refuse (an ID that is no thing name, no DPS registration ID).
    """
    info = await visible_lot(ctx, who, lot)
    if fmt is ExportFormat.JSON:
        manifest = await _manifests(request).get(ctx, info.name)
        body, media_type, filename = manifest.json_bytes, "application/json", f"{info.name}.manifest.json"
    else:
        devices = await ctx.ledger.provisioned_devices(info.name)
        chain = (
            await asyncio.to_thread(lot_ca_chain, ctx.paths.bundles, info.name)
            if fmt is ExportFormat.AZURE_DPS
            else ()
        )
        export = await asyncio.to_thread(build_export, fmt, info.name, devices, chain=chain)
        body, media_type, filename = export.payload(), export.media_type, export.filename
    return Response(
        body, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


# Ports and status ---------------------------------------------------------------------------------


def _port(ctx: ApiContext, station: Station, port: str) -> PortOut:
    control = station.ports[port]
    live = ctx.live.ports.get(port)
    return PortOut(
        port=port,
        enabled=control.enabled,
        busy=control.busy,
        attention=control.attention,
        failures_in_row=control.failures_in_row,
        state=live.state.value if live else None,
        step=live.step if live else None,
        lot=live.lot if live else None,
        since=live.since if live else None,
        reason=live.reason if live else None,
        last_outcome=control.last.outcome if control.last else None,
    )


def _known_port(station: Station, port: str) -> str:
    if port not in station.ports:
        raise HTTPException(404, f"no port {port!r} on this station")
    return port


@router.get("/ports", tags=["ports"], responses=_errors(503))
@guarded(READ_ROLES)
async def list_ports(ctx: Ctx, who: Who) -> list[PortOut]:
    """Every hub port with its controls and latest state."""
    station = _station(ctx)
    return [_port(ctx, station, p) for p in station.ports]


@router.get("/ports/{port}", tags=["ports"], responses=_errors(404, 503))
@guarded(READ_ROLES)
async def get_port(ctx: Ctx, who: Who, port: str) -> PortOut:
    """One hub port."""
    station = _station(ctx)
    return _port(ctx, station, _known_port(station, port))


@router.post("/ports/{port}/enable", tags=["ports"], responses=_errors(404, 503))
@guarded(OPERATE_ROLES)
async def enable_port(ctx: Ctx, who: Who, port: str) -> PortOut:
    """Let the port take boards again."""
    station = _station(ctx)
    station.enable(_known_port(station, port), True)
    return _port(ctx, station, port)


@router.post("/ports/{port}/disable", tags=["ports"], responses=_errors(404, 503))
@guarded(OPERATE_ROLES)
async def disable_port(ctx: Ctx, who: Who, port: str) -> PortOut:
    """Stop the port after its current board."""
    station = _station(ctx)
    station.enable(_known_port(station, port), False)
    return _port(ctx, station, port)


@router.post("/ports/{port}/retry", tags=["ports"], responses=_errors(404, 503))
@guarded(OPERATE_ROLES)
async def retry_port(ctx: Ctx, who: Who, port: str) -> PortOut:
    """Run the port again now, even with the same board in it; clears ATTENTION."""
    station = _station(ctx)
    station.retry(_known_port(station, port))
    return _port(ctx, station, port)


@router.post("/ports/{port}/ack", tags=["ports"], responses=_errors(404, 503))
@guarded(OPERATE_ROLES)
async def acknowledge_port(ctx: Ctx, who: Who, port: str) -> PortOut:
    """Acknowledge ATTENTION: the port goes back to work with the next board."""
    station = _station(ctx)
    station.acknowledge(_known_port(station, port))
    return _port(ctx, station, port)


@router.get("/status", tags=["status"], responses=_errors())
@guarded(READ_ROLES)
async def status(ctx: Ctx, who: Who) -> StatusOut:
    """The station at a glance: ports, jobs by outcome, rate, lot counts (factoryd.telemetry.figures)."""
    station = ctx.station
    ports = list(station.ports.values()) if station else []
    # Lot counts from the ledger, not the periodic progress events: next to the job counts they must
    # not lag behind them.
    lots = [
        ProgressOut.of(info, await ctx.ledger.progress(info.name))
        for info in await ctx.ledger.list_lots()
        if info.state != "closed"
    ]
    rate = ctx.live.rate(datetime.now(UTC), station.started_at if station else None)
    return StatusOut(
        station=ctx.settings.station.name,
        line=ctx.settings.station.line,
        version=__version__,
        running=station is not None and not station.stopping,
        started_at=station.started_at if station else None,
        ports_total=len(ports),
        ports_enabled=sum(c.enabled for c in ports),
        ports_busy=sum(c.busy for c in ports),
        ports_attention=sum(c.attention is not None for c in ports),
        outcomes=dict(station.outcomes) if station else {},
        units_per_hour=rate.per_hour,
        rate_window_s=rate.window_s,
        lots=lots,
    )


# Tokens -------------------------------------------------------------------------------------------


@router.get("/tokens", tags=["tokens"], responses=_errors())
@guarded(ADMIN_ROLES)
async def list_tokens(tokens: Tokens, who: Who) -> list[TokenOut]:
    """Every token (never their secrets)."""
    return [TokenOut.of(t) for t in await asyncio.to_thread(tokens.list_tokens)]


@router.post("/tokens", tags=["tokens"], status_code=201, responses=_errors(409, 413, 415, 422))
@guarded(ADMIN_ROLES, body="json")
async def create_token(tokens: Tokens, who: Who, body: TokenCreate) -> TokenCreated:
    """Create a token; its secret is in this answer only."""
    info, secret = await asyncio.to_thread(
        tokens.create, body.name, body.role, customer=body.customer, expires_days=body.expires_days
    )
    return TokenCreated(**TokenOut.of(info).model_dump(), token=secret)


@router.delete("/tokens/{name}", tags=["tokens"], responses=_errors(404))
@guarded(ADMIN_ROLES)
async def revoke_token(tokens: Tokens, who: Who, name: str) -> TokenOut:
    """Revoke a token for good."""
    return TokenOut.of(await asyncio.to_thread(tokens.revoke, name))
