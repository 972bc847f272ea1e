"""PostgreSQL's one-statement reservation and provision (hot.py ``_reserve_and_append_statement``,
``_provision_at_once_statement``): the link hashed on the server, and every case they leave to the
transactional path. (Lost replies: tests/test_faults_postgres.py.)"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from factoryd.errors import IdsExhaustedError, LedgerError, LotStateError, ReservationConflictError
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.testing import throwaway_postgres_database

pytestmark = pytest.mark.postgres

ACTOR = "station-one"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this module."""
    with throwaway_postgres_database() as url:
        yield url


def _lot(ledger: Ledger, ids: list[str]) -> str:
    name = f"lot-{uuid.uuid4().hex[:10]}"
    # Any printable ID without whitespace: the escaping test needs quotes, backslashes and non-ASCII.
    profile = LotProfile(id_format=r"regex:\S{1,128}")
    ledger.create_lot(name, customer="ACME", profile=profile, target_quantity=None, actor=ACTOR)
    ledger.import_ids(name, "".join(f"{i}\n" for i in ids).encode(), fmt="txt", actor=ACTOR)
    ledger.set_lot_state(name, LotState.ACTIVE, actor=ACTOR)
    return name


def _certificate(der: bytes) -> dict[str, Any]:
    return {"cert_der": der, "cert_serial": "0a", "fingerprint_sha256": hashlib.sha256(der).hexdigest()}


def _claim(ledger: Ledger, lot: str, serial: str) -> str:
    """Reserve an ID for ``serial`` and record it provisioned (a certificate of its own); the ID."""
    reservation = ledger.reserve(lot, serial, station="s", port="1", job_id=None, actor=ACTOR)
    cert = _certificate(serial.encode())
    ledger.mark_provisioned(lot, reservation.device_id, serial, **cert, station="s", port="1", actor=ACTOR)
    return reservation.device_id


class _Counted:
    """Counts the ledger's one-statement writes (the real method runs)."""

    def __init__(self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = ledger._hot_statement

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(ledger, "_hot_statement", counted)


def test_the_server_escapes_a_subject_as_python_does(pg_url: str) -> None:
    """The claim's link hash is completed by the server with ``to_json``: it must be Python's JSON."""
    samples = ['plain', 'q"uote', "back\\slash", "tab\there", "nl\nx", "\x01\x1f\x7f", "é-ü-ß", "中文", "😀",
               "\u2028\u2029", "</script>", "'single'", "a/b"]  # fmt: skip
    with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql")) as connection:
        for sample in samples:
            row = connection.execute("SELECT to_json(%s::varchar)::text", (sample,)).fetchone()
            assert row is not None
            assert row[0] == json.dumps(sample, ensure_ascii=False), sample


def test_ids_that_need_escaping_chain_and_verify(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = ['ID-"1"', "ID\\2", "ID-é3", "ID-中4", "ID-😀5", "ID-</6>", "ID-'7'"]
    with Ledger.open(pg_url) as ledger:
        lot = _lot(ledger, ids)
        counted = _Counted(ledger, monkeypatch)
        got = []
        for n in range(len(ids)):
            serial = f"sn-{uuid.uuid4().hex[:12]}-{n}"
            got.append(_claim(ledger, lot, serial))
        assert sorted(got) == sorted(ids)
        # The lot's set-up left the head remembered: every reservation and provision was one statement.
        assert counted.calls == 2 * len(ids)
        assert ledger.verify_audit() > 0  # recomputed in Python: the server's hashes are Python's


def test_a_moved_head_sends_the_claim_down_the_transactional_path(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes of one station (one chain): each one's remembered head goes stale in turn."""
    with Ledger.open(pg_url) as first, Ledger.open(pg_url) as second:
        lot = _lot(first, [f"M-{n}" for n in range(6)])
        seen = []
        for n in range(6):
            ledger = (first, second)[n % 2]
            serial = f"moved-{n}"
            seen.append(_claim(ledger, lot, serial))
        assert sorted(seen) == [f"M-{n}" for n in range(6)]
        assert first.progress(lot).provisioned == 6
        first.verify_audit()


def test_what_one_statement_cannot_decide_is_decided_as_before(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Ledger.open(pg_url) as ledger:
        lot = _lot(ledger, ["K-1", "K-2"])
        counted = _Counted(ledger, monkeypatch)
        first = ledger.reserve(lot, "board-a", station="s", port="1", job_id=None, actor=ACTOR)
        # The serial holds an ID: resumed (the statement wrote nothing; the transaction resumes it).
        again = ledger.reserve(lot, "board-a", station="s", port="2", job_id=None, actor=ACTOR)
        assert again.resumed
        assert again.device_id == first.device_id
        # A provision of the ID to another serial: refused, nothing written.
        with pytest.raises(ReservationConflictError, match="not reserved to serial"):
            ledger.mark_provisioned(
                lot, first.device_id, "board-b", **_certificate(b"b"), station="s", port="1", actor=ACTOR
            )
        cert = _certificate(b"a")
        ledger.mark_provisioned(lot, first.device_id, "board-a", **cert, station="s", port="1", actor=ACTOR)
        # The same provision again (a retry after a lost reply): already recorded, nothing more.
        ledger.mark_provisioned(lot, first.device_id, "board-a", **cert, station="s", port="1", actor=ACTOR)
        ledger.reserve(lot, "board-c", station="s", port="1", job_id=None, actor=ACTOR)
        with pytest.raises(IdsExhaustedError):
            ledger.reserve(lot, "board-d", station="s", port="1", job_id=None, actor=ACTOR)
        ledger.set_lot_state(lot, LotState.PAUSED, actor="cli")
        with pytest.raises(LotStateError, match="paused"):
            ledger.reserve(lot, "board-e", station="s", port="1", job_id=None, actor=ACTOR)
        assert counted.calls >= 6  # each call tried the one statement first
        progress = ledger.progress(lot)
        assert (progress.provisioned, progress.reserved) == (1, 1)
        ledger.verify_audit()
        with ledger._engine.connect() as connection:
            from sqlalchemy import text

            actions = (
                connection.execute(
                    text("SELECT action FROM audit_entry WHERE chain = :c ORDER BY chain_seq"), {"c": ACTOR}
                )
                .scalars()
                .all()
            )
        # One link per change, none for a refusal or a recorded retry.
        assert actions[-4:] == ["id.reserved", "id.resumed", "id.provisioned", "id.reserved"]


def test_a_provision_closes_its_job_in_the_same_statement(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Ledger.open(pg_url) as ledger:
        lot = _lot(ledger, ["J-1", "J-2"])
        job = ledger.start_job(lot, station="s", port="1", hw_serial="board-j")
        reservation = ledger.reserve(lot, "board-j", station="s", port="1", job_id=job, actor=ACTOR)
        counted = _Counted(ledger, monkeypatch)
        ledger.mark_provisioned(
            lot, reservation.device_id, "board-j", **_certificate(b"j"), station="s", port="1", actor=ACTOR,
            finish_job=job,
        )  # fmt: skip
        assert counted.calls == 1
        with ledger._engine.connect() as connection:
            from sqlalchemy import text

            row = connection.execute(
                text("SELECT outcome, finished_at FROM job WHERE id = :id"), {"id": job}
            ).one()
        assert row.outcome == "provisioned"
        assert row.finished_at is not None
        # A job already closed: the statement writes nothing, and the transaction refuses it whole.
        other = ledger.start_job(lot, station="s", port="2", hw_serial="board-k")
        second = ledger.reserve(lot, "board-k", station="s", port="2", job_id=other, actor=ACTOR)
        ledger.finish_job(other, outcome="failed", reason="test")
        with pytest.raises(LedgerError, match="already finished"):
            ledger.mark_provisioned(
                lot, second.device_id, "board-k", **_certificate(b"k"), station="s", port="2",
                actor=ACTOR, finish_job=other,
            )  # fmt: skip
        record = ledger.find_by_serial(lot, "board-k")
        assert record is not None
        assert str(record.state) == "reserved"
        ledger.verify_audit()
