"""The signer's HTTP API as data: what a station sends and what it gets back (JSON, bytes as base64).

``POST /v1/certificates`` takes an :class:`IssueBody` and answers 200 with an :class:`IssuedBody`, or a
:class:`RefusalBody` (403 refused by a rule, 400 malformed, 503 the signer cannot decide now: retry).
``GET /v1/lots/{lot}`` answers a :class:`LotBody` (the lot's CA chain: all a station needs, no key).
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# A CSR is well under 1 KiB, an attestation chain a few KiB: the request is capped well above both.
MAX_REQUEST_BYTES = 64 * 1024
ISSUE_PATH = "/v1/certificates"
LOT_PATH = "/v1/lots/{lot}"
HEALTH_PATH = "/healthz"
KeyOrigin = Literal["generated", "attested", "registered"]


def b64(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    """Bytes of a base64 field; ValueError naming ``what`` when it is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64") from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvidenceBody(_Body):
    """A board's attestation evidence (pki/attestation.py ``AttestationEvidence``), base64 fields."""

    slot: int = Field(ge=0, le=255)
    nonce: str
    public_key: str
    signature: str
    chain: list[str] = Field(max_length=8)
    possession_challenge: str = ""
    possession_signature: str = ""


class IssueBody(_Body):
    """One certificate request: the CSR, the key the secure element reported, the reservation's facts."""

    request_id: str = Field(min_length=16, max_length=64)
    lot: str = Field(min_length=1, max_length=128)
    device_id: str = Field(min_length=1, max_length=128)
    hw_serial: str = Field(min_length=1, max_length=128)
    job_id: int | None = None
    csr: str  # DER, base64
    key: str  # the uncompressed P-256 point the secure element generated (or attested, or registered)
    key_origin: KeyOrigin = "generated"
    attestation: EvidenceBody | None = None
    # nrf91-at: the %KEYGEN COSE_Sign1 (base64), which names the SHA-256 of ``csr`` as the modem sent it.
    keygen_attestation: str | None = Field(default=None, max_length=4096)


class IssuedBody(_Body):
    """The certificate, recorded in the ledger with its audit entry before this reply was sent."""

    certificate: str  # DER, base64
    cert_serial: str
    fingerprint_sha256: str
    replayed: bool  # the request id was seen before: this is the certificate signed then
    supersedes: str | None = None  # serial of the earlier certificate of this reservation
    quota_remaining: int | None = None


class RefusalBody(_Body):
    """Why the signer did not sign: ``code`` is label-safe and stable, ``message`` says it in words."""

    code: str
    message: str


class LotBody(_Body):
    """What a station needs of a lot the signer signs for."""

    lot: str
    chain_pem: str  # issuing CA first, root last
    device_chain_pem: str  # what the board stores: the chain, then the lot's trust anchors
    quota_remaining: int | None = None
