"""SQLModel rows of the ledger. The schema itself is owned by the Alembic migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

# Column sizes; IDs and serials beyond these are refused at the API before they reach SQL.
NAME_MAX_CHARS = 64
ID_MAX_CHARS = 128
SERIAL_MAX_CHARS = 128
LABEL_MAX_CHARS = 128
AUDIT_SUBJECT_MAX_CHARS = ID_MAX_CHARS + NAME_MAX_CHARS
GENESIS_HASH = "0" * 64
# The one chain of a ledger created before migration 0004 (its links keep GENESIS_HASH as origin).
LEGACY_CHAIN = "ledger"


def _ts(*, nullable: bool) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable))


class LotRow(SQLModel, table=True):
    """One customer order."""

    __tablename__ = "lot"
    __table_args__ = (UniqueConstraint("name", name="uq_lot_name"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=Column(String(NAME_MAX_CHARS), nullable=False))
    customer: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    profile: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    target_quantity: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    created_at: datetime = _ts(nullable=False)


class DeviceRow(SQLModel, table=True):
    """One device ID from a customer's list and what became of it."""

    __tablename__ = "device"
    __table_args__ = (
        # One serial never holds two IDs in a lot (NULLs, i.e. available IDs, do not collide).
        UniqueConstraint("lot_id", "hw_serial", name="uq_device_lot_serial"),
        # An ID is unique across every lot: it is never on two boards.
        UniqueConstraint("device_id", name="uq_device_device_id"),
        # The claim query: first available ID of a lot in import order.
        Index("ix_device_lot_state", "lot_id", "state", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    lot_id: int = Field(sa_column=Column(Integer, ForeignKey("lot.id", name="fk_device_lot"), nullable=False))
    device_id: str = Field(sa_column=Column(String(ID_MAX_CHARS), nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    metadata_: dict[str, str] = Field(sa_column=Column("metadata", JSON, nullable=False))
    hw_serial: str | None = Field(default=None, sa_column=Column(String(SERIAL_MAX_CHARS), nullable=True))
    station: str | None = Field(default=None, sa_column=Column(String(LABEL_MAX_CHARS), nullable=True))
    port: str | None = Field(default=None, sa_column=Column(String(LABEL_MAX_CHARS), nullable=True))
    job_id: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    reserved_at: datetime | None = _ts(nullable=True)
    provisioned_at: datetime | None = _ts(nullable=True)
    cert_der: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    cert_serial: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    cert_fingerprint_sha256: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    void_reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class JobRow(SQLModel, table=True):
    """One provisioning job on one port."""

    __tablename__ = "job"

    id: int | None = Field(default=None, primary_key=True)
    lot_id: int = Field(
        sa_column=Column(Integer, ForeignKey("lot.id", name="fk_job_lot"), nullable=False, index=True)
    )
    station: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    port: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    hw_serial: str | None = Field(default=None, sa_column=Column(String(SERIAL_MAX_CHARS), nullable=True))
    started_at: datetime = _ts(nullable=False)
    finished_at: datetime | None = _ts(nullable=True)
    outcome: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class AttemptRow(SQLModel, table=True):
    """One attempt of one pipeline step within a job."""

    __tablename__ = "attempt"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(
        sa_column=Column(Integer, ForeignKey("job.id", name="fk_attempt_job"), nullable=False, index=True)
    )
    step: str = Field(sa_column=Column(String(64), nullable=False))
    outcome: str = Field(sa_column=Column(String(32), nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    duration_s: float = Field(sa_column=Column(Float, nullable=False))
    at: datetime = _ts(nullable=False)


class AuditEntryRow(SQLModel, table=True):
    """One link of the append-only audit trail: position ``chain_seq`` in the hash chain ``chain``.

    ``seq`` is the trail's order across chains (assigned by the database, not hashed; PostgreSQL may
    skip numbers that a rolled-back append took); the chain position ``chain_seq`` and the
    predecessor's hash are what the link hash covers (``ledger/audit.py``).
    """

    __tablename__ = "audit_entry"
    __table_args__ = (UniqueConstraint("chain", "chain_seq", name="uq_audit_entry_chain_seq"),)

    # INTEGER on SQLite so the column is the rowid (assigned on insert); BIGSERIAL on PostgreSQL.
    seq: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    chain: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    chain_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    at: datetime = _ts(nullable=False)
    actor: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    action: str = Field(sa_column=Column(String(64), nullable=False))
    subject: str = Field(sa_column=Column(String(AUDIT_SUBJECT_MAX_CHARS), nullable=False))
    # Kept as the exact canonical JSON text that was hashed, so verification never
    # depends on how a backend normalises JSON values.
    details: str = Field(sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(sa_column=Column(String(64), nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))


class AuditHeadRow(SQLModel, table=True):
    """One chain's head: its last link. Locked to serialise the appends to that chain only."""

    __tablename__ = "audit_head"

    chain: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), primary_key=True, autoincrement=False))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(sa_column=Column(String(64), nullable=False))


class CloudRegistrationRow(SQLModel, table=True):
    """How far one certificate of a lot got in registering with one cloud account (and region)."""

    __tablename__ = "cloud_registration"
    __table_args__ = (
        # One row per certificate and target: a rerun finds it and does only the missing steps.
        UniqueConstraint("lot_id", "cloud", "target", "cert_sha256", name="uq_cloud_registration_cert"),
    )

    id: int | None = Field(default=None, primary_key=True)
    lot_id: int = Field(
        sa_column=Column(Integer, ForeignKey("lot.id", name="fk_cloud_registration_lot"), nullable=False)
    )
    cloud: str = Field(sa_column=Column(String(16), nullable=False))
    target: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    # NULL for the lot's CA certificate; the device ID for a device certificate.
    device_id: str | None = Field(default=None, sa_column=Column(String(ID_MAX_CHARS), nullable=True))
    cert_sha256: str = Field(sa_column=Column(String(64), nullable=False))
    step: str = Field(sa_column=Column(String(32), nullable=False))
    cloud_cert_id: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    cloud_cert_arn: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    updated_at: datetime = _ts(nullable=False)


class SignerLotRow(SQLModel, table=True):
    """The signer's count of certificates signed for one lot (the quota's count), kept with each issuance.

    Locked by every issuance of the lot, so two requests never both pass a quota at N-1.
    """

    __tablename__ = "signer_lot"

    lot_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("lot.id", name="fk_signer_lot_lot"), primary_key=True, autoincrement=False
        )
    )
    signed: int = Field(sa_column=Column(BigInteger, nullable=False))


class SignerIssuanceRow(SQLModel, table=True):
    """One device certificate the line's signing service signed (``factoryd signer``, issue #23).

    Written by the signer in the transaction that checks the reservation and appends the audit
    entry. ``current`` is 1 for the certificate that stands for its device ID and NULL once a
    re-issue for the same reservation superseded it (NULLs never collide in the unique index).
    """

    __tablename__ = "signer_issuance"
    __table_args__ = (
        # A retried request (lost reply) finds its certificate instead of getting a second one.
        UniqueConstraint("request_id", name="uq_signer_issuance_request"),
        # At most one standing certificate per device ID.
        UniqueConstraint("device_id", "current", name="uq_signer_issuance_current"),
        # The quota count: certificates signed per lot.
        Index("ix_signer_issuance_lot", "lot_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(sa_column=Column(String(64), nullable=False))
    lot_id: int = Field(
        sa_column=Column(Integer, ForeignKey("lot.id", name="fk_signer_issuance_lot"), nullable=False)
    )
    device_id: str = Field(sa_column=Column(String(ID_MAX_CHARS), nullable=False))
    hw_serial: str = Field(sa_column=Column(String(SERIAL_MAX_CHARS), nullable=False))
    station: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    job_id: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    csr_sha256: str = Field(sa_column=Column(String(64), nullable=False))
    cert_der: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    cert_serial: str = Field(sa_column=Column(String(64), nullable=False))
    cert_fingerprint_sha256: str = Field(sa_column=Column(String(64), nullable=False))
    current: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    issued_at: datetime = _ts(nullable=False)
    superseded_at: datetime | None = _ts(nullable=True)


class MatterLotRow(SQLModel, table=True):
    """A Matter lot's sealing salt: the onboarding-codes key is derived from it and the station secret."""

    __tablename__ = "matter_lot"

    lot_id: int = Field(
        sa_column=Column(Integer, ForeignKey("lot.id", name="fk_matter_lot_lot"), primary_key=True)
    )
    kdf_salt: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = _ts(nullable=False)


class MatterDeviceRow(SQLModel, table=True):
    """One Matter device's onboarding codes, sealed (AES-256-GCM): they contain its setup passcode."""

    __tablename__ = "matter_device"
    __table_args__ = (UniqueConstraint("lot_id", "device_id", name="uq_matter_device_lot_device"),)

    id: int | None = Field(default=None, primary_key=True)
    lot_id: int = Field(
        sa_column=Column(Integer, ForeignKey("lot.id", name="fk_matter_device_lot"), nullable=False)
    )
    device_id: str = Field(sa_column=Column(String(ID_MAX_CHARS), nullable=False))
    # nonce (12 bytes) || ciphertext || tag; the AAD binds it to its lot and device.
    sealed_codes: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    discriminator: int = Field(sa_column=Column(Integer, nullable=False))
    product_id: int = Field(sa_column=Column(Integer, nullable=False))
    updated_at: datetime = _ts(nullable=False)


class LabelTemplateRow(SQLModel, table=True):
    """A lot's own label template (factoryd/labels/template.py), validated before it was stored."""

    __tablename__ = "label_template"
    __table_args__ = (UniqueConstraint("lot_id", name="uq_label_template_lot"),)

    id: int | None = Field(default=None, primary_key=True)
    lot_id: int = Field(
        sa_column=Column(Integer, ForeignKey("lot.id", name="fk_label_template_lot"), nullable=False)
    )
    template: str = Field(sa_column=Column(Text, nullable=False))
    sha256: str = Field(sa_column=Column(String(64), nullable=False))
    set_by: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    set_at: datetime = _ts(nullable=False)


class LabelJobRow(SQLModel, table=True):
    """One label to print (a board's own, or a reprint); never the label's bytes (they hold codes)."""

    __tablename__ = "label_job"
    __table_args__ = (
        # One own label per board: the device ID; NULL for reprints (NULLs never collide).
        UniqueConstraint("dedupe_key", name="uq_label_job_dedupe"),
        Index("ix_label_job_station_state", "station", "state", "id"),
        Index("ix_label_job_device", "device_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    lot_id: int = Field(
        sa_column=Column(Integer, ForeignKey("lot.id", name="fk_label_job_lot"), nullable=False)
    )
    device_id: str = Field(sa_column=Column(String(ID_MAX_CHARS), nullable=False))
    station: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    port: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    attempts: int = Field(sa_column=Column(Integer, nullable=False))
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    condition: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    printer: str | None = Field(default=None, sa_column=Column(String(LABEL_MAX_CHARS), nullable=True))
    dedupe_key: str | None = Field(default=None, sa_column=Column(String(ID_MAX_CHARS), nullable=True))
    requested_by: str = Field(sa_column=Column(String(LABEL_MAX_CHARS), nullable=False))
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)
    printed_at: datetime | None = _ts(nullable=True)
