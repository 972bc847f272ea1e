"""Audit hash chain (verify, tamper detection) and schema migrations (fresh, older, unknown revision)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, inspect, text
from sqlmodel import Session, SQLModel

from factoryd.errors import AuditChainError, SchemaVersionError
from factoryd.ledger import Ledger, LedgerUnavailableError, LotProfile, LotState, verify_audit
from factoryd.ledger.audit import link_hash
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.migrate import alembic_config, head_revision
from factoryd.ledger.tables import AuditEntryRow
from factoryd.ledger.testing import throwaway_postgres_database

ACTOR = "test"
LEDGER_TABLES = {"lot", "device", "job", "attempt", "audit_entry", "audit_head", "cloud_registration"}
CERT_DER = b"\x30\x00"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database (these tests tamper with it, so one per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with throwaway_postgres_database() as url:
        yield url


def run_sql(url: str, statement: str, **params: object) -> None:
    """Change the database behind the ledger's back."""
    engine = create_ledger_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement), params)
    finally:
        engine.dispose()


def populate(url: str) -> int:
    """A lot with a provisioned, a reserved and a void ID; return the audit entry count."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    with Ledger.open(url) as ledger:
        ledger.create_lot("L1", customer="ACME", profile=LotProfile(), target_quantity=3, actor=ACTOR)
        ledger.import_ids("L1", "\n".join(ids).encode(), actor=ACTOR)
        ledger.set_lot_state("L1", LotState.ACTIVE, actor=ACTOR)
        first = ledger.reserve("L1", "se-1", station="s", port="1", job_id=None, actor=ACTOR)
        ledger.mark_provisioned(
            "L1",
            first.device_id,
            "se-1",
            cert_der=CERT_DER,
            cert_serial="01",
            fingerprint_sha256=hashlib.sha256(CERT_DER).hexdigest(),
            station="s",
            port="1",
            actor=ACTOR,
        )
        ledger.reserve("L1", "se-2", station="s", port="2", job_id=None, actor=ACTOR)
        ledger.void("L1", ids[2], "lost label", actor=ACTOR)
        return ledger.verify_audit()


# -- audit chain --------------------------------------------------------------------------------


def test_untouched_chain_verifies(fresh_url: str) -> None:
    assert populate(fresh_url) == 7
    assert verify_audit(fresh_url) == 7


def test_altered_entry_is_named_by_seq(fresh_url: str) -> None:
    populate(fresh_url)
    run_sql(fresh_url, "UPDATE audit_entry SET actor = 'mallory' WHERE seq = 4")
    with pytest.raises(AuditChainError, match=r"seq 4: entry was altered"):
        verify_audit(fresh_url)


def test_altered_details_are_named_by_seq(fresh_url: str) -> None:
    populate(fresh_url)
    run_sql(fresh_url, "UPDATE audit_entry SET details = replace(details, 'se-2', 'se-X') WHERE seq = 6")
    with pytest.raises(AuditChainError, match=r"seq 6: entry was altered"):
        verify_audit(fresh_url)


def test_rehashed_forgery_breaks_the_next_link(fresh_url: str) -> None:
    populate(fresh_url)
    run_sql(fresh_url, "UPDATE audit_entry SET hash = :h WHERE seq = 3", h="ab" * 32)
    with pytest.raises(AuditChainError, match=r"seq 3: entry was altered"):
        verify_audit(fresh_url)
    # Even with a hash that matches the forged content, the successor no longer links to it.
    with Ledger.open(fresh_url) as ledger, Session(ledger._engine) as session:
        row = session.get(AuditEntryRow, 3)
        assert row is not None
        forged = link_hash(
            seq=3,
            at=row.at,
            actor="mallory",
            action=row.action,
            subject=row.subject,
            details_json=row.details,
            prev_hash=row.prev_hash,
        )
    run_sql(fresh_url, "UPDATE audit_entry SET actor = 'mallory', hash = :h WHERE seq = 3", h=forged)
    with pytest.raises(AuditChainError, match=r"seq 4: prev_hash does not match seq 3"):
        verify_audit(fresh_url)


def test_deleted_entries_are_detected(fresh_url: str) -> None:
    count = populate(fresh_url)
    run_sql(fresh_url, "DELETE FROM audit_entry WHERE seq = :seq", seq=count)
    with pytest.raises(AuditChainError, match=rf"seq {count}: the chain head records seq {count}"):
        verify_audit(fresh_url)
    run_sql(fresh_url, "DELETE FROM audit_entry WHERE seq = 2")
    with pytest.raises(AuditChainError, match=r"seq 2: entry missing"):
        verify_audit(fresh_url)


def test_entries_appended_behind_the_ledgers_back_are_detected(fresh_url: str) -> None:
    count = populate(fresh_url)
    with Ledger.open(fresh_url) as ledger, Session(ledger._engine) as session:
        last = session.get(AuditEntryRow, count)
        assert last is not None
        # A well-formed link: only the chain head shows it was not written by the ledger.
        forged = AuditEntryRow(
            seq=count + 1,
            chain=last.chain,
            chain_seq=count + 1,
            at=last.at,
            actor="mallory",
            action="id.voided",
            subject="x",
            details="{}",
            prev_hash=last.hash,
            hash=link_hash(
                seq=count + 1,
                at=last.at,
                actor="mallory",
                action="id.voided",
                subject="x",
                details_json="{}",
                prev_hash=last.hash,
            ),
        )
        session.add(forged)
        session.commit()
    with pytest.raises(AuditChainError, match=rf"seq {count + 1}: entries beyond the chain head"):
        verify_audit(fresh_url)


def test_chain_continues_across_reopen(fresh_url: str) -> None:
    populate(fresh_url)
    with Ledger.open(fresh_url) as ledger:
        ledger.audit(actor="op", action="note", subject="L1", details={"text": "ünïcode ✓", "n": 1.5})
        assert ledger.verify_audit() == 8


# -- migrations ---------------------------------------------------------------------------------


def version_in_db(url: str) -> list[str]:
    """The revisions recorded in alembic_version."""
    engine = create_ledger_engine(url)
    try:
        with engine.connect() as connection:
            return list(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()


def test_fresh_database_is_migrated_to_head(fresh_url: str) -> None:
    with Ledger.open(fresh_url) as ledger:
        assert ledger.verify_audit() == 0
        assert set(inspect(ledger._engine).get_table_names()) >= LEDGER_TABLES
    assert version_in_db(fresh_url) == [head_revision()]
    with Ledger.open(fresh_url) as ledger:  # a second open is a no-op
        assert ledger.list_lots() == []


def test_models_match_the_migrations(fresh_url: str) -> None:
    Ledger.open(fresh_url).close()
    metadata = MetaData()
    for name in sorted(LEDGER_TABLES):
        SQLModel.metadata.tables[name].to_metadata(metadata)
    engine = create_ledger_engine(fresh_url)
    try:
        with engine.connect() as connection:
            # Other components keep their tables in the ledger database (e.g. api_tokens from
            # migration 0002); they check their own models.
            context = MigrationContext.configure(
                connection,
                opts={
                    "include_object": lambda _obj, name, kind, _r, _c: (
                        kind != "table" or name in LEDGER_TABLES
                    )
                },
            )
            diff = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_older_database_is_upgraded(fresh_url: str) -> None:
    Ledger.open(fresh_url).close()
    engine = create_ledger_engine(fresh_url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
        assert not LEDGER_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert version_in_db(fresh_url) == []
    populate(fresh_url)
    assert version_in_db(fresh_url) == [head_revision()]


def test_unknown_revision_is_refused_naming_both(fresh_url: str) -> None:
    Ledger.open(fresh_url).close()
    run_sql(fresh_url, "UPDATE alembic_version SET version_num = '0099_from_the_future'")
    with pytest.raises(SchemaVersionError) as caught:
        Ledger.open(fresh_url)
    assert "'0099_from_the_future'" in str(caught.value)
    assert repr(head_revision()) in str(caught.value)
    assert version_in_db(fresh_url) == ["0099_from_the_future"]  # left as it was


def test_unreachable_database_is_a_transient_ledger_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerUnavailableError, match="cannot open the ledger database") as caught:
        Ledger.open(f"sqlite:///{tmp_path / 'missing-dir' / 'ledger.db'}")
    assert caught.value.transient
