"""The ledger's domain model: frozen dataclasses and enums, apart from the ORM rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from factoryd.ledger.profile import LotProfile


class LotState(StrEnum):
    """Life cycle of a lot (one customer order)."""

    DRAFT = "draft"
    ACTIVE = "active"
    PAUSED = "paused"
    CLOSED = "closed"


class DeviceState(StrEnum):
    """Life cycle of one device ID."""

    AVAILABLE = "available"
    RESERVED = "reserved"
    PROVISIONED = "provisioned"
    VOID = "void"


# draft → active ⇄ paused → closed; a draft can be abandoned and an active lot closed directly.
LOT_TRANSITIONS: dict[LotState, frozenset[LotState]] = {
    LotState.DRAFT: frozenset({LotState.ACTIVE, LotState.CLOSED}),
    LotState.ACTIVE: frozenset({LotState.PAUSED, LotState.CLOSED}),
    LotState.PAUSED: frozenset({LotState.ACTIVE, LotState.CLOSED}),
    LotState.CLOSED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class LotInfo:
    """One lot as callers see it; ``name`` is its identity."""

    name: str
    customer: str
    state: LotState
    profile: LotProfile
    target_quantity: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Reservation:
    """The ID bound to a board's secure-element serial."""

    device_id: str
    hw_serial: str
    resumed: bool
    state: DeviceState
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """Everything the ledger knows about one device ID."""

    device_id: str
    lot: str
    state: DeviceState
    metadata: dict[str, str]
    hw_serial: str | None = None
    station: str | None = None
    port: str | None = None
    job_id: int | None = None
    reserved_at: datetime | None = None
    provisioned_at: datetime | None = None
    cert_der: bytes | None = None
    cert_serial: str | None = None
    fingerprint_sha256: str | None = None
    void_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ProvisionedDevice:
    """A device that carries its verified certificate: everything the manifest says about it."""

    device_id: str
    lot: str
    hw_serial: str
    cert_der: bytes
    cert_serial: str  # lowercase hex, no colons
    fingerprint_sha256: str  # lowercase hex SHA-256 of cert_der
    provisioned_at: datetime
    station: str
    port: str  # hub port name as the station config spells it
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class LotProgress:
    """How many IDs of a lot are in each state."""

    total: int
    available: int
    reserved: int
    provisioned: int
    void: int
