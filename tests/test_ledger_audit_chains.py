"""Scale-out audit trail: one hash chain per actor, tampering with each chain, anchors in a signed manifest.

Each test tampers with the database behind the ledger's back (alter, insert, remove, truncate the
tail) on one of several chains and checks that verification names that chain and the first bad
position; the tail truncation with a rewound head is what only the manifest's anchors catch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from cryptography.hazmat.primitives import serialization
from sqlalchemy import text
from sqlmodel import Session, select
from typer.testing import CliRunner

from factoryd.cli.main import app
from factoryd.errors import AuditChainError
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.audit import ChainHead, anchors_from_manifest, chain_genesis, link_hash
from factoryd.ledger.core import audit_chain_heads, verify_audit_chains
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.migrate import alembic_config
from factoryd.ledger.model import DeviceState
from factoryd.ledger.tables import GENESIS_HASH, LEGACY_CHAIN, AuditEntryRow
from factoryd.ledger.testing import throwaway_postgres_database
from factoryd.pki import SoftwareSigner, build_manifest, verify_manifest
from factoryd.pki.manifest_check import check_manifest
from factoryd.pki.testca import TestPki, make_test_pki

LOT = "L1"
STATIONS = ("station-a", "station-b", "station-c")
CERT_DER = b"\x30\x00"
runner = CliRunner()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty ledger database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with throwaway_postgres_database() as pg_url:
        yield pg_url


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=b"audit-chains")


def run_sql(url: str, statement: str, **params: object) -> None:
    """Change the database behind the ledger's back."""
    engine = create_ledger_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(statement), params)
    finally:
        engine.dispose()


def rows(url: str, statement: str, **params: object) -> list[tuple[object, ...]]:
    """Read the database directly."""
    engine = create_ledger_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(r) for r in connection.execute(text(statement), params)]
    finally:
        engine.dispose()


def verify(url: str) -> int:
    """Verify every chain of the ledger at ``url`` (closing it afterwards)."""
    with Ledger.open(url) as ledger:
        return ledger.verify_audit()


def claim(ledger: Ledger, station: str, serial: str) -> None:
    """Reserve and provision one ID as ``station`` (two audited transitions on its chain)."""
    reservation = ledger.reserve(LOT, serial, station=station, port="1", job_id=None, actor=station)
    ledger.mark_provisioned(
        LOT,
        reservation.device_id,
        serial,
        cert_der=CERT_DER,
        cert_serial="01",
        fingerprint_sha256=hashlib.sha256(CERT_DER).hexdigest(),
        station=station,
        port="1",
        actor=station,
    )


def populate(url: str, per_station: int = 3) -> None:
    """A lot (set up by ``cli``) and ``per_station`` claims by each station."""
    with Ledger.open(url) as ledger:
        ledger.create_lot(LOT, customer="ACME", profile=LotProfile(), target_quantity=99, actor="cli")
        ids = "\n".join(str(uuid.uuid4()) for _ in range(per_station * len(STATIONS) + 2))
        ledger.import_ids(LOT, ids.encode(), actor="cli")
        ledger.set_lot_state(LOT, LotState.ACTIVE, actor="cli")
        for index in range(per_station):
            for station in STATIONS:
                claim(ledger, station, f"{station}-se-{index}")


def entry(url: str, chain: str, chain_seq: int) -> AuditEntryRow:
    """One link, typed (its timestamp as the ledger hashes it)."""
    engine = create_ledger_engine(url)
    try:
        with Session(engine) as session:
            return session.exec(
                select(AuditEntryRow).where(
                    AuditEntryRow.chain == chain, AuditEntryRow.chain_seq == chain_seq
                )
            ).one()
    finally:
        engine.dispose()


# -- the chains ---------------------------------------------------------------------------------


def test_each_actor_appends_to_its_own_chain(url: str) -> None:
    populate(url)
    with Ledger.open(url) as ledger:
        heads = {head.chain: head for head in audit_chain_heads(ledger)}
        chains = verify_audit_chains(ledger)
        total = ledger.verify_audit()
    assert set(heads) == {"cli", *STATIONS}
    assert {name: chain.count for name, chain in chains.items()} == {"cli": 3, **dict.fromkeys(STATIONS, 6)}
    assert total == 3 + 6 * len(STATIONS)
    # Every chain starts at its own genesis (a link moved between chains no longer links).
    for station in STATIONS:
        first = rows(url, "SELECT prev_hash FROM audit_entry WHERE chain = :c AND chain_seq = 1", c=station)
        assert first == [(chain_genesis(station),)]
        assert heads[station].seq == 6
    assert len({chain_genesis(s) for s in STATIONS} | {GENESIS_HASH}) == len(STATIONS) + 1
    # The trail's order across chains is the database's seq: unique and increasing.
    seqs = [r[0] for r in rows(url, "SELECT seq FROM audit_entry ORDER BY seq")]
    assert len(set(seqs)) == len(seqs) == total


@pytest.mark.parametrize("victim", ["station-a", "station-c"])
def test_an_altered_entry_is_named_by_chain_and_seq(url: str, victim: str) -> None:
    populate(url)
    run_sql(url, "UPDATE audit_entry SET actor = 'mallory' WHERE chain = :c AND chain_seq = 4", c=victim)
    with pytest.raises(AuditChainError, match=rf"audit chain '{victim}' broken at seq 4: entry was altered"):
        verify(url)


@pytest.mark.parametrize("victim", ["station-a", "station-b"])
def test_an_inserted_entry_is_named_by_chain_and_seq(url: str, victim: str) -> None:
    populate(url)
    # A well-formed link inserted after seq 2: the later links shift up one, so seq 4's prev_hash
    # (which names the old seq 3) no longer matches the new seq 3.
    second = entry(url, victim, 2)
    at, prev = second.at, second.hash
    run_sql(
        url, "UPDATE audit_entry SET chain_seq = chain_seq + 100 WHERE chain = :c AND chain_seq > 2", c=victim
    )
    run_sql(
        url,
        "UPDATE audit_entry SET chain_seq = chain_seq - 99 WHERE chain = :c AND chain_seq > 100",
        c=victim,
    )
    forged = link_hash(
        seq=3, at=at, actor="mallory", action="id.voided", subject="x", details_json="{}", prev_hash=str(prev)
    )
    run_sql(
        url,
        "INSERT INTO audit_entry (chain, chain_seq, at, actor, action, subject, details, prev_hash, hash) "
        "VALUES (:c, 3, :at, 'mallory', 'id.voided', 'x', '{}', :prev, :h)",
        c=victim,
        at=at,
        prev=prev,
        h=forged,
    )
    with pytest.raises(
        AuditChainError, match=rf"audit chain '{victim}' broken at seq 4: prev_hash does not match"
    ):
        verify(url)


@pytest.mark.parametrize("victim", ["cli", "station-b"])
def test_a_removed_entry_is_named_by_chain_and_seq(url: str, victim: str) -> None:
    populate(url)
    run_sql(url, "DELETE FROM audit_entry WHERE chain = :c AND chain_seq = 2", c=victim)
    with pytest.raises(AuditChainError, match=rf"audit chain '{victim}' broken at seq 2: entry missing"):
        verify(url)


@pytest.mark.parametrize("victim", list(STATIONS))
def test_a_truncated_tail_is_caught_by_the_head_and_with_a_rewound_head_by_the_manifest(
    url: str, victim: str, pki: TestPki
) -> None:
    populate(url)
    with Ledger.open(url) as ledger:
        anchors = audit_chain_heads(ledger)
    # A manifest signed now carries every chain's head.
    manifest = build_manifest(
        LOT, [], SoftwareSigner(pki.issuing_key, pki.issuing_cert), [pki.issuing_cert, pki.root_cert],
        audit_chains=anchors,
    )  # fmt: skip
    document = verify_manifest(manifest.json_bytes, manifest.signature_der, [pki.root_cert])
    assert anchors_from_manifest(document) == anchors
    # Cut the victim's last two links: the head row still names the old last one.
    run_sql(url, "DELETE FROM audit_entry WHERE chain = :c AND chain_seq > 4", c=victim)
    with pytest.raises(AuditChainError, match=rf"'{victim}' broken at seq 5: the chain head records seq 6"):
        verify(url)
    # Rewind the head row too: the chain alone is now consistent, only the manifest shows the cut.
    (last,) = rows(url, "SELECT hash FROM audit_entry WHERE chain = :c AND chain_seq = 4", c=victim)
    run_sql(url, "UPDATE audit_head SET seq = 4, hash = :h WHERE chain = :c", h=last[0], c=victim)
    with Ledger.open(url) as ledger:
        assert ledger.verify_audit() == 3 + 6 * len(STATIONS) - 2
        with pytest.raises(
            AuditChainError,
            match=rf"'{victim}' broken at seq 5: the manifest anchors seq 6 but the trail ends at seq 4",
        ):
            verify_audit_chains(ledger, anchors_from_manifest(document))


def test_a_rewritten_chain_differs_from_its_anchor(url: str) -> None:
    populate(url)
    with Ledger.open(url) as ledger:
        anchors = audit_chain_heads(ledger)
    victim = "station-b"
    # Rewrite the chain from seq 6 with a consistent forgery (new hash, head row to match).
    sixth = entry(url, victim, 6)
    at, prev = sixth.at, sixth.prev_hash
    forged = link_hash(
        seq=6, at=at, actor="mallory", action="id.voided", subject="x", details_json="{}", prev_hash=str(prev)
    )
    run_sql(
        url,
        "UPDATE audit_entry SET actor = 'mallory', action = 'id.voided', subject = 'x', details = '{}', "
        "hash = :h WHERE chain = :c AND chain_seq = 6",
        h=forged,
        c=victim,
    )
    run_sql(url, "UPDATE audit_head SET hash = :h WHERE chain = :c", h=forged, c=victim)
    with Ledger.open(url) as ledger:
        ledger.verify_audit()  # consistent on its own
        with pytest.raises(AuditChainError, match=rf"'{victim}' broken at seq 6: the entry differs"):
            verify_audit_chains(ledger, anchors)


def test_a_chain_without_a_head_row_is_refused(url: str) -> None:
    populate(url)
    run_sql(url, "DELETE FROM audit_head WHERE chain = 'station-a'")
    with pytest.raises(AuditChainError, match=r"'station-a' broken at seq 1: entries beyond the chain head"):
        verify(url)


def test_concurrent_stations_keep_every_chain_intact(url: str) -> None:
    """Four stations claim at once, each on its own chain: no duplicate ID, every chain verifies."""
    stations = [f"st-{i}" for i in range(4)]
    per_station = 6
    with Ledger.open(url) as ledger:
        ledger.create_lot(LOT, customer="ACME", profile=LotProfile(), target_quantity=99, actor="cli")
        ids = "\n".join(str(uuid.uuid4()) for _ in range(per_station * len(stations)))
        ledger.import_ids(LOT, ids.encode(), actor="cli")
        ledger.set_lot_state(LOT, LotState.ACTIVE, actor="cli")
        errors: list[BaseException] = []

        def work(station: str) -> None:
            try:
                for index in range(per_station):
                    claim(ledger, station, f"{station}-{index}")
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in stations]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors
        assert ledger.progress(LOT).provisioned == per_station * len(stations)
        chains = verify_audit_chains(ledger)
    assert {s: chains[s].count for s in stations} == dict.fromkeys(stations, 2 * per_station)
    ids_held = rows(url, "SELECT device_id FROM device WHERE state = 'provisioned'")
    assert len(set(ids_held)) == len(ids_held) == per_station * len(stations)


# -- migration 0004 -----------------------------------------------------------------------------


def _at_revision(url: str, revision: str) -> None:
    """Bring a fresh database to ``revision`` (an older ledger)."""
    engine = create_ledger_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def test_the_single_chain_of_an_older_ledger_becomes_one_chain(url: str) -> None:
    _at_revision(url, "0003_cloud_registration")
    # Three links as a 0003 ledger wrote them: seq 1..3 from the all-zero genesis, head row id 1.
    prev = GENESIS_HASH
    at = "2026-11-30 10:00:00+00:00"
    for seq in (1, 2, 3):
        digest = link_hash(
            seq=seq,
            at=dt.datetime.fromisoformat(at),
            actor="old-station",
            action="note",
            subject=f"s{seq}",
            details_json="{}",
            prev_hash=prev,
        )
        run_sql(
            url,
            "INSERT INTO audit_entry (seq, at, actor, action, subject, details, prev_hash, hash) "
            "VALUES (:seq, :at, 'old-station', 'note', :subject, '{}', :prev, :h)",
            seq=seq,
            at=at,
            subject=f"s{seq}",
            prev=prev,
            h=digest,
        )
        prev = digest
    run_sql(url, "UPDATE audit_head SET seq = 3, hash = :h WHERE id = 1", h=prev)
    with Ledger.open(url) as ledger:  # migrates to head
        assert audit_chain_heads(ledger) == [ChainHead(LEGACY_CHAIN, 3, prev)]
        assert ledger.verify_audit() == 3
        ledger.audit(actor="old-station", action="note", subject="after", details={})
        chains = verify_audit_chains(ledger)
    assert {name: c.count for name, c in chains.items()} == {LEGACY_CHAIN: 3, "old-station": 1}
    # The new entry continues the trail's order after the migrated ones.
    assert rows(url, "SELECT seq, chain, chain_seq FROM audit_entry WHERE chain_seq = 1 ORDER BY seq") == [
        (1, LEGACY_CHAIN, 1),
        (4, "old-station", 1),
    ]
    # Tampering with the migrated chain is still named.
    run_sql(
        url, "UPDATE audit_entry SET subject = 'forged' WHERE chain = :c AND chain_seq = 2", c=LEGACY_CHAIN
    )
    with pytest.raises(AuditChainError, match=rf"'{LEGACY_CHAIN}' broken at seq 2: entry was altered"):
        verify(url)


def test_downgrade_below_0004_is_refused_while_other_chains_exist(url: str) -> None:
    populate(url, per_station=1)
    engine = create_ledger_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            with pytest.raises(RuntimeError, match="cannot downgrade below 0004"):
                command.downgrade(config, "0003_cloud_registration")
    finally:
        engine.dispose()
    assert verify(url) == 3 + 2 * len(STATIONS)


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_verify_checks_the_manifests_anchors(url: str, pki: TestPki, tmp_path: Path) -> None:
    populate(url)
    with Ledger.open(url) as ledger:
        anchors = audit_chain_heads(ledger)
    manifest = build_manifest(
        LOT, [], SoftwareSigner(pki.issuing_key, pki.issuing_cert), [pki.issuing_cert, pki.root_cert],
        audit_chains=anchors,
    )  # fmt: skip
    json_path = tmp_path / f"{LOT}.manifest.json"
    json_path.write_bytes(manifest.json_bytes)
    (tmp_path / f"{LOT}.manifest.p7s").write_bytes(manifest.signature_der)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.root_cert.public_bytes(serialization.Encoding.PEM))
    args = ["audit", "verify", "--url", url, "--manifest", str(json_path), "--ca", str(ca)]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert f"{3 + 6 * len(STATIONS)} entries in {1 + len(STATIONS)} chains" in ok.output
    assert f"{len(anchors)} chain heads anchored" in ok.output
    # Cut station-c's tail and rewind its head: only the anchors show it.
    run_sql(url, "DELETE FROM audit_entry WHERE chain = 'station-c' AND chain_seq > 5")
    (last,) = rows(url, "SELECT hash FROM audit_entry WHERE chain = 'station-c' AND chain_seq = 5")
    run_sql(url, "UPDATE audit_head SET seq = 5, hash = :h WHERE chain = 'station-c'", h=last[0])
    assert runner.invoke(app, ["audit", "verify", "--url", url]).exit_code == 0
    cut = runner.invoke(app, args)
    assert cut.exit_code == 1
    assert "'station-c' broken at seq 6" in cut.output
    assert f"{LOT}.manifest.json anchors seq 6" in cut.output
    # A manifest whose signature does not verify is refused, not trusted.
    (tmp_path / f"{LOT}.manifest.p7s").write_bytes(manifest.signature_der[:-3] + b"\x00\x00\x00")
    forged = runner.invoke(app, args)
    assert forged.exit_code != 0
    assert "manifest not usable" in forged.output
    # Without --ca the anchors are not trusted at all.
    no_ca = runner.invoke(app, ["audit", "verify", "--url", url, "--manifest", str(json_path)])
    assert no_ca.exit_code != 0
    assert "--manifest needs --ca" in no_ca.output


def test_two_ledgers_appending_to_one_chain_correct_each_others_stale_head(url: str) -> None:
    """Each ledger remembers the head it appended; the other's appends make that hint stale."""
    with Ledger.open(url) as first, Ledger.open(url) as second:
        for index in range(6):
            (first if index % 3 else second).audit(actor="op", action="note", subject=f"n{index}", details={})
        assert verify_audit_chains(first)["op"].count == 6
    subjects = rows(url, "SELECT subject FROM audit_entry WHERE chain = 'op' ORDER BY chain_seq")
    assert subjects == [(f"n{i}",) for i in range(6)]


def test_a_provision_onto_a_stale_head_still_records_its_link_in_order(url: str) -> None:
    """On PostgreSQL the provision and its link go in one statement chained onto the remembered head;
    when another ledger moved that head, the provision stands and its link is chained after it."""
    with Ledger.open(url) as first, Ledger.open(url) as second:
        first.create_lot(LOT, customer="ACME", profile=LotProfile(), target_quantity=9, actor="cli")
        first.import_ids(LOT, "\n".join(str(uuid.uuid4()) for _ in range(4)).encode(), actor="cli")
        first.set_lot_state(LOT, LotState.ACTIVE, actor="cli")
        reservation = first.reserve(LOT, "se-a", station="st", port="1", job_id=None, actor="st")
        # The other ledger appends to the same chain: the first one's remembered head is now stale.
        claim(second, "st", "se-b")
        first.mark_provisioned(
            LOT,
            reservation.device_id,
            "se-a",
            cert_der=CERT_DER,
            cert_serial="01",
            fingerprint_sha256=hashlib.sha256(CERT_DER).hexdigest(),
            station="st",
            port="1",
            actor="st",
        )
        assert first.find_device(reservation.device_id).state is DeviceState.PROVISIONED  # type: ignore[union-attr]
        assert verify_audit_chains(first)["st"].count == 4
    actions = rows(url, "SELECT action, subject FROM audit_entry WHERE chain = 'st' ORDER BY chain_seq")
    assert [a for a, _ in actions] == ["id.reserved", "id.reserved", "id.provisioned", "id.provisioned"]
    assert actions[3] == ("id.provisioned", reservation.device_id)


def test_the_customer_side_check_reports_the_anchors_form(url: str, pki: TestPki) -> None:
    populate(url, per_station=1)
    with Ledger.open(url) as ledger:
        anchors = audit_chain_heads(ledger)
    signer = SoftwareSigner(pki.issuing_key, pki.issuing_cert)
    chain = [pki.issuing_cert, pki.root_cert]
    manifest = build_manifest(LOT, [], signer, chain, audit_chains=anchors)
    report = check_manifest(manifest.json_bytes, manifest.signature_der, [pki.root_cert])
    assert report.ok, report.lines()
    found = {c.name: c for c in report.checks}["audit anchors"]
    assert found.ok
    assert f"{len(anchors)} audit chain heads anchored" in found.detail
    # A malformed anchor list (signed as such) is named, not ignored.
    bad = build_manifest(LOT, [], signer, chain, audit_chains=[ChainHead("st", 1, "not-a-hash")])
    report = check_manifest(bad.json_bytes, bad.signature_der, [pki.root_cert])
    assert not {c.name: c for c in report.checks}["audit anchors"].ok
    # A manifest made without anchors gets no such check (older manifests still verify).
    plain = build_manifest(LOT, [], signer, chain)
    checks = check_manifest(plain.json_bytes, plain.signature_der, [pki.root_cert]).checks
    assert "audit anchors" not in {c.name for c in checks}
