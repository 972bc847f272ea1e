"""The signing service's decisions and its HTTP API: who asks (the client certificate), what the ledger
allows, what the CSR says, and the signature.

:class:`Authority` is the blocking core (run on worker threads): it opens each lot once (its CA key
from the signer's bundle store, a software key or a PKCS#11 token; the lot's attestation roots or parts
manifest), checks the customer quota, and hands the ledger (``ledger/issuance.py``) a ``sign`` step
that checks the CSR with the station's own rules for the lot's board profile (``PROFILE_RULES``: the
functions the station jobs apply, ``Issuer.verify_csr`` or the Arduino / nRF91 job's; the key the
station reported; attestation evidence when the lot requires it) and builds the certificate from
the lot profile (``Issuer.issue``, then the profile's certificate rule: the Arduino sketch's
template). The ledger records the certificate and its audit entry in the transaction that checked
the reservation. Every refusal is audited
(``signer.refused``) and counted by reason.

:func:`create_signer_app` is the FastAPI app. The station's identity is the CN of the client
certificate the TLS handshake verified (``signer/server.py`` puts it in the ASGI TLS extension,
``scope["extensions"]["tls"]["client_cert_chain"]``), never anything in the request body.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from factoryd.errors import (
    CsrRejectedError,
    FactorydError,
    LedgerError,
    LotNotFoundError,
    SignerError,
    StationClockError,
)
from factoryd.jobs.arduino import verify_arduino_csr
from factoryd.jobs.lots import LotContext, load_lot_context
from factoryd.jobs.nrf91 import verify_nrf91_request
from factoryd.ledger.errors import LedgerUnavailableError
from factoryd.ledger.issuance import (
    IssuanceLedger,
    IssuanceRefusedError,
    IssuanceRequest,
    ReservedDevice,
    SignedDevice,
)
from factoryd.pki.arduino import arduino_template_fields
from factoryd.pki.attestation import AttestationError, AttestationEvidence, check_csr_key, verify_attestation
from factoryd.pki.bundle import pem_of
from factoryd.pki.issuer import IssuedCertificate
from factoryd.pki.pkcs11 import Pkcs11Signer
from factoryd.pki.store import LOT_NAME_RE, BundleStore
from factoryd.service import StationPaths
from factoryd.signer.errors import SigningRefusedError
from factoryd.signer.lineca import STATION_OU
from factoryd.signer.metrics import SignerMetrics
from factoryd.signer.quota import Quota, QuotaStore
from factoryd.signer.wire import (
    HEALTH_PATH,
    ISSUE_PATH,
    LOT_PATH,
    MAX_REQUEST_BYTES,
    EvidenceBody,
    IssueBody,
    IssuedBody,
    LotBody,
    RefusalBody,
    b64,
    unb64,
)
from factoryd.telemetry.events import JobEvent, TelemetrySink

log = structlog.get_logger(__name__)

CSR = x509.CertificateSigningRequest
# Worker threads for requests: each holds one ledger connection for one transaction (the PostgreSQL
# pool has 10 + 20 overflow) and signs; more only queue on the pool and the audit head.
WORKER_THREADS = 8
# The MQTT event of a refusal names this as its port (the events topic is per station and port).
EVENT_PORT = "signer"


@dataclass(frozen=True)
class SignerPolicy:
    """The service's rules from its settings."""

    actor: str  # the signer's name in the audit trail ([station] name of its config)
    max_per_device: int
    require_quota: bool


def _evidence(body: EvidenceBody | None) -> AttestationEvidence | None:
    if body is None:
        return None
    return AttestationEvidence(
        slot=body.slot,
        nonce=unb64(body.nonce, "attestation nonce"),
        public_key=unb64(body.public_key, "attested key"),
        signature=unb64(body.signature, "attestation signature"),
        chain=tuple(unb64(c, "attestation certificate") for c in body.chain),
        possession_challenge=unb64(body.possession_challenge, "possession challenge"),
        possession_signature=unb64(body.possession_signature, "possession signature"),
    )


@dataclass(frozen=True)
class SignRequest:
    """What a request asks to have signed, decoded."""

    csr_der: bytes  # as the board sent it
    point: bytes  # the key the station reports (generated, attested or registered)
    evidence: AttestationEvidence | None
    keygen_attestation: bytes | None  # nrf91-at: the %KEYGEN COSE_Sign1


def _generic_csr(
    lot: LotContext, reserved: ReservedDevice, asked: SignRequest
) -> x509.CertificateSigningRequest:
    return lot.issuer.verify_csr(asked.csr_der, reserved.device_id, fields=reserved.metadata)


def _arduino_csr(
    lot: LotContext, reserved: ReservedDevice, asked: SignRequest
) -> x509.CertificateSigningRequest:
    return verify_arduino_csr(lot.issuer, asked.csr_der, reserved.device_id)


def _arduino_certificate(issued: IssuedCertificate, device_id: str) -> None:
    arduino_template_fields(issued.cert, device_id)


def _nrf91_csr(
    lot: LotContext, reserved: ReservedDevice, asked: SignRequest
) -> x509.CertificateSigningRequest:
    return verify_nrf91_request(
        lot,
        reserved.device_id,
        reserved.metadata,
        asked.csr_der,
        cose=asked.keygen_attestation,
        hw_serial=reserved.hw_serial,
    )


@dataclass(frozen=True)
class ProfileRules:
    """A board profile's CSR and certificate rules: the very functions its station job applies."""

    verify_csr: Callable[[LotContext, ReservedDevice, SignRequest], CSR]
    check_certificate: Callable[[IssuedCertificate, str], None] | None = None
    takes_keygen_attestation: bool = False


GENERIC_RULES = ProfileRules(_generic_csr)
# Profiles whose job has rules of its own (jobs/arduino.py, jobs/nrf91.py); the others verify with
# ``Issuer.verify_csr`` (jobs/board.py's ``issue_for_key``).
PROFILE_RULES: dict[str, ProfileRules] = {
    "arduino-v1": ProfileRules(_arduino_csr, check_certificate=_arduino_certificate),
    "nrf91-at": ProfileRules(_nrf91_csr, takes_keygen_attestation=True),
}


def profile_rules(protocol: str) -> ProfileRules:
    """The CSR and certificate rules of a lot's board profile."""
    return PROFILE_RULES.get(protocol, GENERIC_RULES)


def refusal_code(exc: FactorydError) -> str:
    """The label-safe code a refusal is reported and counted under."""
    if isinstance(exc, SigningRefusedError | IssuanceRefusedError):
        return exc.code
    return exc.reason  # csr_rejected, attestation_*, ledger_unavailable, …


class Authority:
    """The blocking core of the signer: lots, quota, the checked issuance (thread-safe)."""

    def __init__(
        self,
        *,
        ledger: IssuanceLedger,
        bundles: BundleStore,
        paths: StationPaths,
        quotas: QuotaStore,
        policy: SignerPolicy,
        metrics: SignerMetrics,
        events: TelemetrySink | None = None,
    ) -> None:
        self._ledger = ledger
        self._bundles = bundles
        self._paths = paths
        self._quotas = quotas
        self._policy = policy
        self._metrics = metrics
        self._events = events
        self._lots: dict[str, LotContext] = {}
        self._lots_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Authority(actor={self._policy.actor!r}, lots={sorted(self._lots)!r})"

    @property
    def ledger(self) -> IssuanceLedger:
        """The ledger the signer checks against."""
        return self._ledger

    def close(self) -> None:
        """Log out of every token the lots opened."""
        with self._lots_lock:
            for lot in self._lots.values():
                if isinstance(lot.issuer.signer, Pkcs11Signer):
                    lot.issuer.signer.close()
            self._lots.clear()

    def lot(self, name: str) -> LotContext:
        """The lot with its CA opened (once; a token logs in here)."""
        if not LOT_NAME_RE.fullmatch(name):
            raise SigningRefusedError("bad_request", f"invalid lot name {name!r}")
        with self._lots_lock:
            cached = self._lots.get(name)
            if cached is not None:
                return cached
            try:
                info = self._ledger.get_lot(name)
            except LotNotFoundError:
                raise SigningRefusedError("unknown_lot", f"no lot named {name!r}") from None
            if not self._bundles.exists(name):
                raise SigningRefusedError("no_lot_ca", f"the signer holds no CA bundle for lot {name!r}")
            lot = load_lot_context(info, self._bundles, self._paths.firmware, self._paths.attestation)
            # From the first station's look at it, the ledger records only what this signer signs.
            self._ledger.manage_lot(name)
            self._lots[name] = lot
            return lot

    def quota(self, lot: LotContext, now: dt.datetime) -> Quota | None:
        """The lot's verified quota; SigningRefusedError when missing but required, broken or expired."""
        quota = self._quotas.current(lot.name, lot.issuer.chain, now=now)
        if quota is None and self._policy.require_quota:
            raise SigningRefusedError(
                "quota_missing", f"lot {lot.name!r} has no customer quota, and this signer requires one"
            )
        return quota

    def describe(self, name: str) -> LotBody:
        """What a station needs of a lot: its chains (no key), the quota left."""
        lot = self.lot(name)
        try:
            quota = self._quotas.current(lot.name, lot.issuer.chain, now=dt.datetime.now(dt.UTC))
        except SigningRefusedError:
            quota = None  # a broken or expired quota refuses each request with its reason, not the lot
        remaining = (
            None if quota is None else max(0, quota.max_certificates - self._ledger.signed_count(name))
        )
        self._metrics.quota(name, remaining)
        return LotBody(
            lot=name,
            chain_pem=pem_of(lot.issuer.chain).decode("ascii"),
            device_chain_pem=lot.chain_pem.decode("ascii"),
            quota_remaining=remaining,
        )

    def issue(self, station: str, body: IssueBody) -> IssuedBody:
        """Check and sign one request (blocking); a FactorydError (refusal) is audited and re-raised."""
        started = time.perf_counter()
        self._metrics.in_flight.inc()
        try:
            result = self._issue(station, body)
        except FactorydError as exc:
            self._refused(station, body, exc, time.perf_counter() - started)
            raise
        finally:
            self._metrics.in_flight.dec()
        self._metrics.issued(
            lot=body.lot,
            station=station,
            replayed=result.replayed,
            superseded=result.supersedes is not None,
            duration_s=time.perf_counter() - started,
            remaining=result.quota_remaining,
        )
        log.info(
            "certificate signed",
            station=station,
            lot=body.lot,
            device_id=body.device_id,
            cert_serial=result.cert_serial,
            replayed=result.replayed,
            supersedes=result.supersedes,
        )
        return result

    def _issue(self, station: str, body: IssueBody) -> IssuedBody:
        try:
            csr_der = unb64(body.csr, "csr")
            point = unb64(body.key, "key")
            evidence = _evidence(body.attestation)
            cose = (
                None
                if body.keygen_attestation is None
                else unb64(body.keygen_attestation, "keygen attestation")
            )
        except ValueError as exc:
            raise SigningRefusedError("bad_request", str(exc)) from None
        lot = self.lot(body.lot)
        quota = self.quota(lot, dt.datetime.now(dt.UTC))
        request = IssuanceRequest(
            request_id=body.request_id,
            lot=body.lot,
            device_id=body.device_id,
            hw_serial=body.hw_serial,
            station=station,
            job_id=body.job_id,
            csr_sha256=hashlib.sha256(csr_der).hexdigest(),
        )

        def sign(reserved: ReservedDevice) -> SignedDevice:
            return self._sign(lot, reserved, SignRequest(csr_der, point, evidence, cose))

        outcome = self._ledger.issue(
            request,
            sign=sign,
            actor=self._policy.actor,
            max_per_device=self._policy.max_per_device,
            quota_max=None if quota is None else quota.max_certificates,
        )
        record = outcome.record
        return IssuedBody(
            certificate=b64(record.cert_der),
            cert_serial=record.cert_serial,
            fingerprint_sha256=record.fingerprint_sha256,
            replayed=outcome.replayed,
            supersedes=outcome.superseded,
            quota_remaining=None if quota is None else max(0, quota.max_certificates - outcome.signed_in_lot),
        )

    @staticmethod
    def _sign(lot: LotContext, reserved: ReservedDevice, asked: SignRequest) -> SignedDevice:
        """The station's CSR rules for the lot's board profile, checked here again, then the certificate."""
        issuer = lot.issuer
        rules = profile_rules(lot.profile.protocol)
        if asked.keygen_attestation is not None and not rules.takes_keygen_attestation:
            raise SigningRefusedError(
                "bad_request",
                f"a %KEYGEN attestation comes only with nrf91-at requests, not {lot.profile.protocol}",
            )
        point, evidence = asked.point, asked.evidence
        csr = rules.verify_csr(lot, reserved, asked)
        genuineness: dict[str, str] | None = None
        if lot.profile.attestation == "required":
            if lot.registered_parts:
                part = lot.registered_parts.get(reserved.hw_serial)
                if part is None:
                    raise AttestationError(
                        "attestation_unregistered",
                        f"serial {reserved.hw_serial} is not in the lot's parts manifest",
                    )
                # The CSR's own signature proves possession of the registered key.
                check_csr_key(part.public_key, csr)
                genuineness = {"method": "parts_manifest", "parts_entry_id": part.entry_id}
            else:
                # The station chose the nonce; what binds is the vendor's signature over serial and key.
                checked = verify_attestation(
                    evidence,
                    nonce=evidence.nonce if evidence is not None else b"",
                    serial=reserved.hw_serial,
                    roots=lot.attestation_roots,
                )
                check_csr_key(checked.public_key, csr)
                genuineness = checked.details()
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or (
            public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) != point
        ):
            raise CsrRejectedError("CSR key is not the key the secure element reported (replayed CSR?)")
        issued = issuer.issue(csr, reserved.device_id, fields=reserved.metadata)
        if rules.check_certificate is not None:
            # The profile's template (the Arduino sketch rebuilds the certificate): before it is recorded.
            rules.check_certificate(issued, reserved.device_id)
        return SignedDevice(
            cert_der=issued.der,
            cert_serial=issued.serial_hex.lower(),
            fingerprint_sha256=issued.fingerprint_sha256,
            genuineness=genuineness,
        )

    def _refused(self, station: str, body: IssueBody, exc: FactorydError, duration_s: float) -> None:
        code = refusal_code(exc)
        unavailable = is_unavailable(exc)
        self._metrics.refused(
            lot=body.lot, station=station, reason=code, duration_s=duration_s, error=unavailable
        )
        log.warning(
            "certificate request refused",
            station=station,
            lot=body.lot,
            device_id=body.device_id,
            code=code,
            error=str(exc),
        )
        if self._events is not None:
            self._events.job_event(
                JobEvent(
                    kind="job_failed",
                    port=EVENT_PORT,
                    lot=body.lot if LOT_NAME_RE.fullmatch(body.lot) else None,
                    job_id=body.job_id,
                    step="issue",
                    outcome="refused",
                    reason=code,
                    device_id=None,
                    attempt=0,
                    duration_s=duration_s,
                    at=dt.datetime.now(dt.UTC),
                )
            )
        try:
            self._ledger.record_refusal(
                actor=self._policy.actor,
                station=station,
                lot=body.lot,
                device_id=body.device_id,
                code=code,
                message=str(exc),
                request_id=body.request_id,
            )
        except LedgerError as audit_error:
            log.error("the refusal could not be audited", code=code, error=str(audit_error))

    def refuse_unidentified(self, code: str, message: str) -> None:
        """Audit and count a request without a usable client certificate (TLS passed, identity did not)."""
        self._metrics.refused(lot="unknown", station="unknown", reason=code, duration_s=0.0)
        self.audit_unidentified(code, message)

    def audit_unidentified(self, code: str, message: str) -> None:
        """Audit a refusal of a peer that is no known station (``signer.refused``, station ``unknown``)."""
        try:
            self._ledger.record_refusal(
                actor=self._policy.actor,
                station="unknown",
                lot="",
                device_id="",
                code=code,
                message=message,
                request_id="",
            )
        except LedgerError as audit_error:
            log.error("the refusal could not be audited", code=code, error=str(audit_error))


def is_unavailable(exc: FactorydError) -> bool:
    """Errors that say "ask again later" (HTTP 503), not "no"."""
    return isinstance(exc, LedgerUnavailableError | SignerError | StationClockError)


def _status(exc: FactorydError) -> int:
    if is_unavailable(exc):
        return 503
    if refusal_code(exc) == "bad_request":
        return 400
    return 403


def station_of(certificate_pem: str | None) -> str:
    """The station a verified client certificate names (its CN); SigningRefusedError otherwise."""
    if not certificate_pem:
        raise SigningRefusedError("no_client_certificate", "the request came without a client certificate")
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
    except ValueError:
        raise SigningRefusedError("bad_client_certificate", "the client certificate does not parse") from None
    units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if units != [STATION_OU] or len(names) != 1 or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise SigningRefusedError(
            "bad_client_certificate", "the client certificate is not a station certificate of the line CA"
        )
    return str(names[0])


def _peer_pem(request: Request) -> str | None:
    tls = request.scope.get("extensions", {}).get("tls", {})
    chain = tls.get("client_cert_chain") or []
    return str(chain[0]) if chain else None


def _refusal_response(exc: FactorydError) -> JSONResponse:
    body = RefusalBody(code=refusal_code(exc), message=str(exc))
    return JSONResponse(body.model_dump(), status_code=_status(exc))


def create_signer_app(authority: Authority, executor: ThreadPoolExecutor) -> FastAPI:
    """The signer's HTTP API (served by ``signer/server.py`` with mutual TLS only).

    The blocking work (ledger transactions, signing) runs on ``executor``, which the caller owns.
    """
    app = FastAPI(title="factoryd signer", docs_url=None, redoc_url=None, openapi_url=None)

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    @app.get(HEALTH_PATH)
    async def health() -> Response:
        """200 while the signer can reach its ledger."""
        try:
            await run(authority.ledger.list_lots)
        except LedgerError as exc:
            return JSONResponse({"ok": False, "error": str(exc)}, status_code=503)
        return JSONResponse({"ok": True})

    @app.get(LOT_PATH)
    async def lot(request: Request, lot: str) -> Response:
        """The lot's CA chain (a station's view of the lot: no key)."""
        try:
            station_of(_peer_pem(request))
            body: LotBody = await run(authority.describe, lot)
        except FactorydError as exc:
            return _refusal_response(exc)
        return JSONResponse(body.model_dump())

    @app.post(ISSUE_PATH)
    async def issue(request: Request) -> Response:
        """Check a certificate request against the ledger and sign it, or refuse it with a reason."""
        try:
            station = station_of(_peer_pem(request))
        except SigningRefusedError as exc:
            await run(authority.refuse_unidentified, exc.code, str(exc))
            return _refusal_response(exc)
        declared = request.headers.get("content-length", "0")
        raw = b"" if not declared.isdigit() or int(declared) > MAX_REQUEST_BYTES else await request.body()
        if not raw or len(raw) > MAX_REQUEST_BYTES:
            return _refusal_response(
                SigningRefusedError(
                    "bad_request", f"request body empty or larger than {MAX_REQUEST_BYTES} bytes"
                )
            )
        try:
            body = IssueBody.model_validate_json(raw)
        except ValidationError as exc:
            problem = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            return _refusal_response(SigningRefusedError("bad_request", f"malformed request: {problem}"))
        try:
            result: IssuedBody = await run(authority.issue, station, body)
        except FactorydError as exc:
            return _refusal_response(exc)
        return JSONResponse(result.model_dump())

    return app
