"""Request and response bodies of the HTTP API (the OpenAPI spec is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from factoryd.api.tokens import MAX_EXPIRES_DAYS, Role, TokenInfo
from factoryd.ledger import LotInfo, LotProfile, LotProgress

# Deeper JSON than this is not a lot profile; it is an attempt to exhaust the validator.
MAX_JSON_DEPTH = 16


def _refuse_bad_text(value: Any, where: str = "body", depth: int = 0) -> None:
    """Refuse NUL and lone surrogates anywhere in a JSON body (they break hashing and SQL text)."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where}: text contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: text is not valid Unicode (lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_bad_text(key, where, depth + 1)
            _refuse_bad_text(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_bad_text(item, f"{where}[{index}]", depth + 1)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _clean_text(cls, data: Any) -> Any:
        _refuse_bad_text(data)
        return data


class LotCreate(_Request):
    """A new lot (created in state ``draft``)."""

    name: str = Field(description="1..64 letters, digits, '.', '_', '-'; starts with a letter or digit")
    customer: str = Field(description="The customer the lot belongs to (customer tokens see only theirs)")
    profile: LotProfile = Field(
        default_factory=LotProfile, description="How the lot's boards are provisioned"
    )
    target_quantity: int | None = Field(default=None, ge=1, le=100_000_000)


class FirmwareOut(BaseModel):
    """A lot's current MCUboot image, as recorded in its profile."""

    sha256: str = Field(description="MCUboot image hash (the SHA256 TLV, what boards report), hex")
    version: str | None = Field(description="major.minor.revision+build")
    security_counter: int | None
    signing_key_hash: str | None = Field(description="SHA-256 of the signing key (imgtool getpubhash)")

    @classmethod
    def of(cls, profile: LotProfile) -> FirmwareOut | None:
        """From a lot profile; None when the lot has no image."""
        if profile.firmware_sha256 is None:
            return None
        return cls(
            sha256=profile.firmware_sha256,
            version=profile.firmware_version,
            security_counter=profile.firmware_security_counter,
            signing_key_hash=profile.firmware_key_hash,
        )


class LotOut(BaseModel):
    """A lot."""

    name: str
    customer: str
    state: str
    profile: LotProfile
    firmware: FirmwareOut | None = None
    target_quantity: int | None
    created_at: datetime

    @classmethod
    def of(cls, info: LotInfo) -> LotOut:
        """From the ledger's LotInfo."""
        return cls(
            name=info.name,
            customer=info.customer,
            state=info.state.value,
            profile=info.profile,
            firmware=FirmwareOut.of(info.profile),
            target_quantity=info.target_quantity,
            created_at=info.created_at,
        )


class ProgressOut(BaseModel):
    """How many IDs of a lot are in each state."""

    lot: str
    total: int
    available: int
    reserved: int
    provisioned: int
    void: int
    target_quantity: int | None

    @classmethod
    def of(cls, info: LotInfo, progress: LotProgress) -> ProgressOut:
        """From the ledger's counts."""
        return cls(
            lot=info.name,
            total=progress.total,
            available=progress.available,
            reserved=progress.reserved,
            provisioned=progress.provisioned,
            void=progress.void,
            target_quantity=info.target_quantity,
        )


class ImportOut(BaseModel):
    """Result of an ID list upload."""

    lot: str
    imported: int


class FirmwareUploadOut(BaseModel):
    """Result of a firmware upload: the image is now the lot's."""

    lot: str
    firmware: FirmwareOut
    signing_key_replaced: bool


class BundleOut(BaseModel):
    """Result of a CA bundle upload (the key itself is never returned)."""

    lot: str
    ca_subject: str
    chain_length: int
    trust_anchors: int


class PortOut(BaseModel):
    """One hub port: operator controls and its latest published state."""

    port: str
    enabled: bool
    busy: bool
    attention: str | None
    failures_in_row: int
    state: str | None
    step: str | None
    lot: str | None
    since: datetime | None
    reason: str | None
    last_outcome: str | None


class StatusOut(BaseModel):
    """The station at a glance."""

    station: str
    line: str
    version: str
    running: bool
    started_at: datetime | None
    ports_total: int
    ports_enabled: int
    ports_busy: int
    ports_attention: int
    outcomes: dict[str, int]
    units_per_hour: float = Field(description="devices provisioned per hour over rate_window_s")
    rate_window_s: float = Field(description="the rate's window: since start, at most 10 minutes")
    lots: list[ProgressOut]


class TokenCreate(_Request):
    """A new API token."""

    name: str = Field(description="1..64 letters, digits, '.', '_', '@', '-'; never reused")
    role: Role
    customer: str | None = Field(default=None, description="Required for (and only for) customer tokens")
    expires_days: int | None = Field(default=None, ge=1, le=MAX_EXPIRES_DAYS)


class TokenOut(BaseModel):
    """An API token's record (never its secret)."""

    name: str
    role: Role
    customer: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, info: TokenInfo) -> TokenOut:
        """From the store's TokenInfo."""
        return cls(
            name=info.name,
            role=info.role,
            customer=info.customer,
            created_at=info.created_at,
            expires_at=info.expires_at,
            revoked_at=info.revoked_at,
            last_used_at=info.last_used_at,
        )


class TokenCreated(TokenOut):
    """A new token with its secret: shown this once, stored only as a hash."""

    token: str


class ErrorOut(BaseModel):
    """Every 4xx/5xx answer: one sentence naming the problem."""

    detail: str


class HealthOut(BaseModel):
    """Liveness or readiness."""

    status: str
    checks: dict[str, str] = Field(default_factory=dict)
