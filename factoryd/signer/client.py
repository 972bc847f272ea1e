"""A station's side of the signer: mutual TLS to ``[pki] signer``, the lot's chain, idempotent requests.

With ``[pki] signer`` set the station holds no CA key: :meth:`SignerClient.open_lot` fetches the lot's
chain (the ``Issuer`` then checks CSRs and renders subjects as before, on a :class:`ChainSigner` that
cannot sign), and :meth:`SignerClient.issue` sends each CSR. A request keeps one id over its retries,
so a lost reply retried returns the same certificate; an unreachable signer holds the board at the
issue step (its key made, nothing written, its ID kept reserved), tells the port why, and retries
with capped backoff until ``signer_hold_s`` has passed, when the job restarts (transient error).
Every certificate that comes back is checked before use: the lot's CA signed it, for the CSR's key.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from factoryd.config import PkiSettings
from factoryd.errors import ConfigError, SignerError, VerificationError
from factoryd.pki.attestation import AttestationEvidence
from factoryd.pki.issuer import IssuedCertificate
from factoryd.pki.signer import CaPublicKey
from factoryd.signer.errors import SignerUnavailableError, SigningRefusedError
from factoryd.signer.wire import (
    HEALTH_PATH,
    ISSUE_PATH,
    LOT_PATH,
    EvidenceBody,
    IssueBody,
    IssuedBody,
    KeyOrigin,
    LotBody,
    RefusalBody,
    b64,
    unb64,
)

log = structlog.get_logger(__name__)

# Backoff between attempts while the signer is unreachable: quick at first (a restart takes a
# second or two), then every few seconds so a down signer is not hammered by every held board.
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
# Status codes that mean "ask again later" (the signer's ledger is down, it is overloaded).
RETRY_STATUS = frozenset({429, 502, 503, 504})
# The station's intake pause while the signer is down (jobs/scheduler.py PAUSING_REASONS).
SIGNER_PAUSE_KEY = "signer"


@dataclass(frozen=True)
class SignerEndpoint:
    """Where the signer is and the files this station proves itself with."""

    url: str
    cert_file: Path
    key_file: Path
    ca_file: Path
    timeout_s: float
    hold_s: float


def _credential_or_file(file: Path | None, credential: str, what: str) -> Path:
    if file is not None:
        path = file
    else:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"pki.signer is set but the {what} is neither a file (pki.signer_*_file) nor a systemd "
                f"credential ({credential}; no $CREDENTIALS_DIRECTORY)"
            )
        path = Path(directory) / credential
    if not path.is_file():
        raise ConfigError(f"the signer {what} {path} does not exist")
    return path


def endpoint_from_settings(pki: PkiSettings) -> SignerEndpoint:
    """The signer endpoint of a station's settings; ConfigError when unset or a file is missing."""
    if pki.signer is None:
        raise ConfigError("pki.signer is not set")
    return SignerEndpoint(
        url=pki.signer.rstrip("/"),
        cert_file=_credential_or_file(pki.signer_cert_file, pki.signer_cert_credential, "client certificate"),
        key_file=_credential_or_file(pki.signer_key_file, pki.signer_key_credential, "client key"),
        ca_file=_credential_or_file(pki.signer_ca_file, pki.signer_ca_credential, "CA (the line CA)"),
        timeout_s=pki.signer_timeout_s,
        hold_s=pki.signer_hold_s,
    )


def client_ssl_context(endpoint: SignerEndpoint) -> ssl.SSLContext:
    """TLS 1.2+ to the signer, its certificate checked against the line CA only, ours presented."""
    try:
        context = ssl.create_default_context(cafile=str(endpoint.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(endpoint.cert_file), str(endpoint.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"the signer's TLS files cannot be used: {exc}") from exc
    return context


class ChainSigner:
    """A lot's CA as a station on the signer holds it: the certificate, no key (``Signer`` protocol)."""

    blocking = False

    def __init__(self, certificate: x509.Certificate) -> None:
        self._certificate = certificate

    def __repr__(self) -> str:
        return f"ChainSigner(subject={self._certificate.subject.rfc4514_string()!r})"

    @property
    def certificate(self) -> x509.Certificate:
        """The issuing CA certificate."""
        return self._certificate

    @property
    def public_key(self) -> CaPublicKey:
        """The CA public key."""
        key = self._certificate.public_key()
        if not isinstance(key, CaPublicKey):
            raise SignerError("the CA key type is not supported")
        return key

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Refused: the lot's certificates are signed by the line's signer."""
        raise SignerError(
            "this station has no CA key: the lot's certificates are signed by the line's signer"
        )

    def sign_bytes(self, data: bytes) -> bytes:
        """Refused: the lot's CA key is on the signer."""
        raise SignerError("this station has no CA key: the lot's CA key is on the line's signer")


@dataclass(frozen=True)
class RemoteLot:
    """A lot as the signer describes it."""

    chain: tuple[x509.Certificate, ...]
    device_chain_pem: bytes

    @property
    def signer(self) -> ChainSigner:
        """The chain's issuing CA, without a key."""
        return ChainSigner(self.chain[0])


@dataclass(frozen=True)
class RemoteRequest:
    """One board's certificate request, with the facts of its reservation."""

    lot: str
    device_id: str
    hw_serial: str
    job_id: int | None
    csr_der: bytes
    key: bytes  # uncompressed P-256 point
    key_origin: KeyOrigin
    evidence: AttestationEvidence | None = None
    # nrf91-at: the COSE_Sign1 that came with the %KEYGEN CSR (it names the SHA-256 of ``csr_der``).
    keygen_attestation: bytes | None = None

    def request_id(self, station: str) -> str:
        """Stable over retries of this request, new for a new CSR (a restarted job's new key)."""
        digest = hashlib.sha256()
        for part in (station, self.lot, self.device_id, self.hw_serial, str(self.job_id)):
            digest.update(part.encode() + b"\x00")
        digest.update(self.csr_der)
        return digest.hexdigest()[:48]

    def body(self, station: str) -> IssueBody:
        """The JSON body of the request."""
        evidence = self.evidence
        return IssueBody(
            request_id=self.request_id(station),
            lot=self.lot,
            device_id=self.device_id,
            hw_serial=self.hw_serial,
            job_id=self.job_id,
            csr=b64(self.csr_der),
            key=b64(self.key),
            key_origin=self.key_origin,
            keygen_attestation=None if self.keygen_attestation is None else b64(self.keygen_attestation),
            attestation=None
            if evidence is None
            else EvidenceBody(
                slot=evidence.slot,
                nonce=b64(evidence.nonce),
                public_key=b64(evidence.public_key),
                signature=b64(evidence.signature),
                chain=[b64(c) for c in evidence.chain],
                possession_challenge=b64(evidence.possession_challenge),
                possession_signature=b64(evidence.possession_signature),
            ),
        )


def _refusal(response: httpx.Response) -> SigningRefusedError:
    try:
        body = RefusalBody.model_validate_json(response.content)
    except ValidationError:
        return SigningRefusedError(
            "http_" + str(response.status_code), f"the signer answered {response.status_code}"
        )
    return SigningRefusedError(body.code, f"the signer refused: {body.message}")


def check_returned(cert: x509.Certificate, ca: x509.Certificate, point: bytes) -> None:
    """The certificate the signer returned is the lot CA's, for the CSR's key (verify, never assume).

    ``point`` is the key the request reported, which the station checked is the CSR's (the CSR's
    own bytes may not parse here: an nRF91's signature algorithm can carry a NULL parameter).
    """
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise VerificationError("the signer returned a certificate the lot's CA did not sign") from exc
    public = cert.public_key()
    uncompressed = serialization.PublicFormat.UncompressedPoint
    if not isinstance(public, ec.EllipticCurvePublicKey) or (
        public.public_bytes(serialization.Encoding.X962, uncompressed) != point
    ):
        raise VerificationError("the signer returned a certificate for another key than the CSR's")


class SignerClient:
    """The station's connection to the signer (an async context manager the daemon enters)."""

    def __init__(self, endpoint: SignerEndpoint, station: str) -> None:
        self._endpoint = endpoint
        self._station = station
        self._ssl = client_ssl_context(endpoint)
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"SignerClient({self._endpoint.url!r}, station={self._station!r})"

    async def __aenter__(self) -> Self:
        self._client = httpx.AsyncClient(
            base_url=self._endpoint.url, verify=self._ssl, timeout=self._endpoint.timeout_s
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def probe(self) -> None:
        """Return when the signer answers its health check; SignerUnavailableError while it does not."""
        client = self._client
        if client is None:
            raise SignerUnavailableError("the signer client is closed")
        try:
            response = await client.get(HEALTH_PATH)
        except httpx.HTTPError as exc:
            raise SignerUnavailableError(
                f"the signer at {self._endpoint.url} cannot be reached: {exc}"
            ) from exc
        if response.status_code != httpx.codes.OK:
            raise SignerUnavailableError(f"the signer is not ready ({response.status_code})")

    def open_lot(self, lot: str) -> RemoteLot:
        """The lot's chain from the signer (blocking: lots open off the event loop)."""
        try:
            with httpx.Client(
                base_url=self._endpoint.url, verify=self._ssl, timeout=self._endpoint.timeout_s
            ) as http:
                response = http.get(LOT_PATH.format(lot=lot))
        except httpx.HTTPError as exc:
            raise SignerUnavailableError(
                f"the signer at {self._endpoint.url} cannot be reached: {exc}"
            ) from exc
        if response.status_code in RETRY_STATUS:
            raise SignerUnavailableError(
                f"the signer cannot describe lot {lot!r} now ({response.status_code})"
            )
        if response.status_code != httpx.codes.OK:
            raise _refusal(response)
        try:
            body = LotBody.model_validate_json(response.content)
            chain = tuple(x509.load_pem_x509_certificates(body.chain_pem.encode()))
        except (ValidationError, ValueError) as exc:
            raise SignerError(f"the signer's description of lot {lot!r} does not parse: {exc}") from exc
        if not chain:
            raise SignerError(f"the signer sent no CA chain for lot {lot!r}")
        return RemoteLot(chain=chain, device_chain_pem=body.device_chain_pem.encode())

    async def issue(
        self, request: RemoteRequest, ca: x509.Certificate, *, on_hold: Callable[[str], None]
    ) -> IssuedCertificate:
        """Have the signer sign; waits out an unreachable signer ``hold_s``, then SignerUnavailableError."""
        client = self._client
        if client is None:
            raise RuntimeError("SignerClient used outside its async with block")
        body = request.body(self._station).model_dump_json().encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._endpoint.hold_s
        delay = RETRY_INITIAL_S
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await client.post(
                    ISSUE_PATH, content=body, headers={"content-type": "application/json"}
                )
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code == httpx.codes.OK:
                    return self._issued(response, ca, request.key)
                if response.status_code not in RETRY_STATUS:
                    raise _refusal(response)
                problem = f"it answered {response.status_code}"
            if loop.time() + delay > deadline:
                raise SignerUnavailableError(
                    f"the signer at {self._endpoint.url} did not sign within {self._endpoint.hold_s:g} s "
                    f"({attempt} attempts; last: {problem})"
                )
            log.warning("signer unreachable; holding the board", problem=problem, attempt=attempt)
            on_hold(f"signer unreachable ({problem}); the board waits, retry {attempt}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    @staticmethod
    def _issued(response: httpx.Response, ca: x509.Certificate, point: bytes) -> IssuedCertificate:
        try:
            body = IssuedBody.model_validate_json(response.content)
            cert = x509.load_der_x509_certificate(unb64(body.certificate, "certificate"))
        except (ValidationError, ValueError) as exc:
            raise VerificationError(f"the signer's reply does not parse: {exc}") from exc
        check_returned(cert, ca, point)
        return IssuedCertificate.from_certificate(cert)
