"""The ledger's label tables on SQLite and PostgreSQL: one label per board, audited reprints, attempts."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData
from sqlmodel import Session, SQLModel, col, select

from factoryd.labels.errors import LabelTemplateError
from factoryd.labels.template import DEFAULT_TEMPLATE_TOML, MATTER_TEMPLATE_TOML
from factoryd.ledger import DeviceStateError, Ledger, LotProfile, LotState
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.labels import LabelKind, LabelOutcome, LabelState
from factoryd.ledger.migrate import alembic_config
from factoryd.ledger.tables import AuditEntryRow, LabelJobRow, LabelTemplateRow
from factoryd.ledger.testing import throwaway_postgres_database

ACTOR = "test"
LOT = "LOT-1"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with throwaway_postgres_database() as pg_url:
        yield pg_url


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    with Ledger.open(url) as opened:
        opened.create_lot(LOT, customer="acme", profile=LotProfile(), target_quantity=None, actor=ACTOR)
        ids = [str(uuid.uuid4()) for _ in range(3)]
        opened.import_ids(LOT, "".join(f"{i}\n" for i in ids).encode(), filename="ids.txt", actor=ACTOR)
        opened.set_lot_state(LOT, LotState.ACTIVE, actor=ACTOR)
        yield opened


def provision(ledger: Ledger, serial: str) -> str:
    """Reserve and provision one ID for ``serial``; its device ID."""
    reservation = ledger.reserve(LOT, serial, station="st-1", port="1", job_id=None, actor=ACTOR)
    cert_der = b"certificate " + serial.encode()
    ledger.mark_provisioned(
        LOT,
        reservation.device_id,
        serial,
        cert_der=cert_der,
        cert_serial=serial,
        fingerprint_sha256=hashlib.sha256(cert_der).hexdigest(),
        station="st-1",
        port="1",
        actor=ACTOR,
    )
    return reservation.device_id


def audits(url: str, action: str) -> list[tuple[str, str, dict[str, Any]]]:
    engine = create_ledger_engine(url)
    try:
        with Session(engine) as session:
            rows = session.exec(select(AuditEntryRow).order_by(col(AuditEntryRow.seq))).all()
            return [(r.actor, r.subject, json.loads(r.details)) for r in rows if r.action == action]
    finally:
        engine.dispose()


def test_migration_0006_follows_0005_and_matches_the_model(url: str) -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_revision("0006_labels").down_revision == "0005_matter"
    Ledger.open(url).close()
    mine = (LabelTemplateRow.__tablename__, LabelJobRow.__tablename__)
    metadata = MetaData()
    for name in ("lot", *mine):
        SQLModel.metadata.tables[name].to_metadata(metadata)
    engine = create_ledger_engine(url)

    def only_mine(_obj: Any, name: str | None, kind: str, _reflected: bool, _compare_to: Any) -> bool:
        return kind != "table" or name in mine

    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"include_object": only_mine})
            diff = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_one_board_label_per_device_even_when_queued_twice_at_once(ledger: Ledger) -> None:
    device_id = provision(ledger, "0123aa")
    got: list[int] = []

    def queue() -> None:
        job = ledger.queue_label(LOT, device_id, station="st-1", port="1", kind=LabelKind.BOARD, actor="st-1")
        got.append(job.id)

    threads = [threading.Thread(target=queue) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(got)) == 1
    assert len(ledger.label_jobs(device_id=device_id)) == 1


def test_only_provisioned_devices_get_labels(ledger: Ledger) -> None:
    reservation = ledger.reserve(LOT, "0123bb", station="st-1", port="2", job_id=None, actor=ACTOR)
    with pytest.raises(DeviceStateError, match="not provisioned"):
        ledger.queue_label(
            LOT, reservation.device_id, station="st-1", port="2", kind=LabelKind.BOARD, actor="st-1"
        )
    assert ledger.label_jobs() == []


def test_reprints_are_audited_and_attempts_recorded(ledger: Ledger, url: str) -> None:
    device_id = provision(ledger, "0123cc")
    board = ledger.queue_label(LOT, device_id, station="st-1", port="1", kind=LabelKind.BOARD, actor="st-1")
    retry = ledger.record_label_attempt(
        board.id, outcome=LabelOutcome.RETRY, error="paper out", condition="paper_out", printer="p:9100"
    )
    assert (retry.state, retry.attempts, retry.condition) == (LabelState.QUEUED, 1, "paper_out")
    done = ledger.record_label_attempt(
        board.id, outcome=LabelOutcome.PRINTED, error=None, condition=None, printer="p:9100"
    )
    assert (done.state, done.attempts, done.condition) == (LabelState.PRINTED, 2, None)
    assert done.printed_at is not None
    # A job that left the queue is not changed by a late attempt.
    late = ledger.record_label_attempt(
        board.id, outcome=LabelOutcome.FAILED, error="x", condition="render", printer=None
    )
    assert late.state is LabelState.PRINTED
    reprint = ledger.queue_label(LOT, device_id, station="st-1", port="3", kind=LabelKind.REPRINT, actor="op")
    again = ledger.queue_label(LOT, device_id, station="st-1", port="3", kind=LabelKind.REPRINT, actor="op")
    assert reprint.id != again.id
    assert [(a, s, d["port"]) for a, s, d in audits(url, "label.reprint")] == [
        ("op", device_id, "3"),
        ("op", device_id, "3"),
    ]
    queued = ledger.label_jobs(station="st-1", state=LabelState.QUEUED, oldest_first=True)
    assert [j.id for j in queued] == [reprint.id, again.id]
    assert ledger.verify_audit() > 0


def test_templates_are_stored_audited_and_checked_against_the_lot(ledger: Ledger, url: str) -> None:
    assert ledger.label_template(LOT) is None
    with pytest.raises(LabelTemplateError, match="not a Matter lot"):
        ledger.set_label_template(LOT, MATTER_TEMPLATE_TOML, actor=ACTOR)
    info = ledger.set_label_template(LOT, DEFAULT_TEMPLATE_TOML, actor=ACTOR)
    stored = ledger.label_template(LOT)
    assert stored is not None
    assert (stored.text, stored.sha256) == (DEFAULT_TEMPLATE_TOML, info.sha256)
    assert [d["sha256"] for _, _, d in audits(url, "label.template")] == [info.sha256]
