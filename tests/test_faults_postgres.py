"""Fault: the PostgreSQL server restarts, or the network to it drops, while stations provision.

A TCP proxy the test controls (tests/helpers/tcp_proxy.py) sits between the stations and a real
throwaway PostgreSQL cluster of the test's own (so it can be restarted). Two stations (two Daemon
instances, each with its own simulated hub) share one lot. The test cuts the network mid-run for a
moment, then for longer than the board step timeouts (one station's jobs wait at their safe point,
the other's hold runs out so they fail cleanly and resume), and restarts the server once. Afterwards
the ledger and the boards agree: 0 IDs on two boards, 0 lost, every provisioned board's certificate
is the ledger's and matches its key, no job left open, the audit chain verifies, and both stations
resumed by themselves (no restart). Also here: a COMMIT whose reply is lost is resolved by reading the
transaction's status back, never assumed.

CI runs a short version; FAULTS_LONG=1 runs longer cuts, more of them, on more ports.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from factoryd.config import Settings, load_settings
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.errors import LedgerCommitUnknownError
from factoryd.jobs.ledger_hold import RECOVERED_ACTION
from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger import engine as ledger_engine
from factoryd.ledger.errors import LedgerUnavailableError
from factoryd.ledger.testing import throwaway_postgres_database
from factoryd.sim.board import SimBoard, Timing
from factoryd.sim.hub import SimHub
from factoryd.sim.remote import board_inventory
from factoryd.telemetry.events import RecordingSink
from factoryd.telemetry.reasons import reason_text
from tests.helpers.line_procs import check_invariants
from tests.helpers.postgres import PostgresCluster
from tests.helpers.provisioned import TEST_ID_FORMAT
from tests.helpers.station import LOT, Line, make_line
from tests.helpers.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.faults, pytest.mark.postgres]

LONG = os.environ.get("FAULTS_LONG") == "1"
PORTS = 8 if LONG else 3
# The cuts: a blip, then one longer than every board step timeout and than station B's hold.
SHORT_CUT_S = 2.0 if LONG else 1.0
LONG_CUT_S = 30.0 if LONG else 5.0
ROUNDS = 3 if LONG else 1
# A silent network (no reset, nothing delivered): past the ledger's TCP user timeout (10 s) in the long
# run, so connections die of it; in CI a short stall the ledger calls simply wait out.
BLACKHOLE_S = 15.0 if LONG else 2.0
# Station B gives up holding after this (its jobs then fail cleanly and resume); A holds throughout.
B_HOLD_S = 10.0 if LONG else 2.0
# Boards each station provisions between faults (progress proves it is working again).
BETWEEN_FAULTS = 6 if LONG else 3
# A board of a few hundred ms: faults land inside jobs, not between them.
BOARD_TIMING = Timing(boot_s=0.02, keygen_s=0.06, csr_s=0.01, sign_s=0.02, write_s=0.02, enumerate_s=0.05)
RUN_TIMEOUT_S = 600.0 if LONG else 120.0
PROGRESS_TIMEOUT_S = 60.0


class RestartableCluster(PostgresCluster):
    """The helper's throwaway cluster, restartable on the same port (a server restart, not a new one)."""

    def restart(self) -> None:
        """Fast shutdown (SIGINT: every session is terminated), then start again on the same port."""
        self._signal(signal.SIGINT)
        if not self._start_server():
            raise AssertionError(f"PostgreSQL did not restart:\n{self.log()[-2000:]}")


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[RestartableCluster]:
    cluster = RestartableCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _via(url: str, proxy: TcpProxy) -> str:
    """The same database URL through the proxy."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def _station_settings(line: Line, name: str, url: str) -> Settings:
    return load_settings(
        None,
        station={"name": name, "line": "faults", "state_dir": line.settings.station.state_dir},
        ledger={"url": url},
        hub={"backend": "sim", "max_powered": PORTS, "power_cycle_off_s": 0.0},
        jobs={
            "lot": LOT,
            "rescan_s": 0.05,
            "reply_timeout_scale": 0.3,
            "backoff_initial_s": 0.01,
            "attention_after_failures": 1000,
        },
        metrics={"enabled": False},
        api={"enabled": False},
        mqtt={"enabled": False},
        log={"level": "warning", "format": "console"},
    )


def _paused_gauge(daemon: Daemon) -> float | None:
    return daemon.metrics.registry.get_sample_value(
        "factoryd_intake_paused", {"reason": "ledger_unavailable"}
    )


def _open_jobs(url: str) -> int:
    from sqlalchemy.engine import make_url

    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as connection:
        row = connection.execute("SELECT count(*) FROM job WHERE finished_at IS NULL").fetchone()
        return int(row[0]) if row else -1


def _recovered_entries(url: str) -> int:
    from sqlalchemy.engine import make_url

    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as connection:
        row = connection.execute(
            "SELECT count(*) FROM audit_entry WHERE action = %s", (RECOVERED_ACTION,)
        ).fetchone()
        return int(row[0]) if row else -1


@pytest.mark.timeout(900 if LONG else 180)
async def test_two_stations_survive_network_cuts_and_a_server_restart(
    tmp_path: Path, own_cluster: RestartableCluster
) -> None:
    with throwaway_postgres_database(own_cluster.admin_url) as direct_url:
        line = await make_line(tmp_path, boards=4000, ports=PORTS, ledger_url=direct_url)
        proxy = TcpProxy("127.0.0.1", own_cluster.port).start()
        try:
            await _run_line(line, direct_url, proxy, own_cluster)
        finally:
            proxy.close()


async def _run_line(line: Line, direct_url: str, proxy: TcpProxy, cluster: RestartableCluster) -> None:
    url = _via(direct_url, proxy)
    hubs = {name: SimHub(PORTS, lambda: _board(line), name=f"hub-{name}") for name in ("a", "b")}
    sinks = {name: RecordingSink() for name in hubs}
    stations: dict[str, Station] = {}
    running: dict[str, Daemon] = {}
    finished = asyncio.Event()
    timeline: list[tuple[str, float]] = []

    async def on_ready(station: Station) -> None:
        stations[station.pipeline.settings.station] = station

    def provisioned(name: str) -> int:
        station = stations.get(f"station-{name}")
        return 0 if station is None else station.outcomes["provisioned"]

    async def progress(goal_each: int, what: str) -> None:
        base = {name: provisioned(name) for name in hubs}
        deadline = time.monotonic() + PROGRESS_TIMEOUT_S
        while any(provisioned(n) < base[n] + goal_each for n in hubs):
            if time.monotonic() > deadline:
                raise AssertionError(f"no progress {what}: {base} -> { {n: provisioned(n) for n in hubs} }")
            await asyncio.sleep(0.05)
        timeline.append((f"progress {what}", time.monotonic()))

    async def resumed(what: str, since: float) -> None:
        deadline = time.monotonic() + PROGRESS_TIMEOUT_S
        while any(st.intake_paused for st in stations.values()):
            if time.monotonic() > deadline:
                raise AssertionError(f"intake did not resume {what}")
            await asyncio.sleep(0.02)
        timeline.append((f"intake resumed {what} (s)", time.monotonic() - since))

    async def schedule() -> None:
        try:
            while len(stations) < len(hubs):
                await asyncio.sleep(0.05)
            await progress(BETWEEN_FAULTS, "before the first fault")
            for _ in range(ROUNDS):
                proxy.cut()
                await asyncio.sleep(SHORT_CUT_S)
                proxy.restore()
                restored = time.monotonic()
                await resumed("after a short cut", restored)
                await progress(BETWEEN_FAULTS, "after a short cut")
                proxy.cut()
                await asyncio.sleep(LONG_CUT_S)
                assert all(st.intake_paused for st in stations.values()), "intake kept running while cut"
                for daemon in running.values():  # what Grafana sees
                    assert _paused_gauge(daemon) == 1.0
                proxy.restore()
                restored = time.monotonic()
                await resumed("after a long cut", restored)
                await progress(BETWEEN_FAULTS, "after a long cut")
            proxy.blackhole()
            await asyncio.sleep(BLACKHOLE_S)
            proxy.restore()
            restored = time.monotonic()
            await progress(BETWEEN_FAULTS, "after a silent network")
            timeline.append(("3 boards each after a silent network ended (s)", time.monotonic() - restored))
            restarting = time.monotonic()
            await asyncio.to_thread(cluster.restart)
            timeline.append(("server restart took (s)", time.monotonic() - restarting))
            await progress(BETWEEN_FAULTS, "after the server restart")
            timeline.append(("3 boards each after the restart began (s)", time.monotonic() - restarting))
        finally:
            finished.set()

    async def run_station(name: str, hold_s: float) -> Daemon:
        hooks = DaemonHooks(
            hub=hubs[name],
            passphrase=line.passphrase,
            stop_when=lambda _station: finished.is_set(),
            on_ready=on_ready,
            extra_sinks=(sinks[name],),
            ledger_hold_s=hold_s,
        )
        daemon = running[name] = Daemon(_station_settings(line, f"station-{name}", url), hooks)
        await daemon.run()
        return daemon

    async with asyncio.timeout(RUN_TIMEOUT_S), asyncio.TaskGroup() as tg:
        scheduled = tg.create_task(schedule())
        daemon_a = tg.create_task(run_station("a", 300.0))
        daemon_b = tg.create_task(run_station("b", B_HOLD_S))
    scheduled.result()
    daemons = {"a": daemon_a.result(), "b": daemon_b.result()}

    # Both stations resumed by themselves, said why they paused, and are not paused now.
    for name, daemon in daemons.items():
        station = stations[f"station-{name}"]
        assert not station.pauses, (name, station.pauses)
        # No port was left for an operator to clear: the outage was the station's, not the boards'.
        assert all(c.attention is None for c in station.ports.values()), station.ports
        assert station.pauses_total >= 1 + ROUNDS
        assert daemon.ledger_hold is not None
        assert daemon.ledger_hold.recoveries >= 1
        assert daemon.ledger_hold.held_calls >= 1  # jobs in flight waited at their safe point
        assert _paused_gauge(daemon) == 0.0
        told = [u for u in sinks[name].ports if u.reason == "ledger_unavailable"]
        assert told, f"station {name} never showed the ledger outage on a port"
        held = [r for r in station.results if r.reason == "ledger_unavailable"]
        if name == "a":
            assert not held, "station A holds for 300 s: no job may fail for the outage"
    assert "database cannot be reached" in reason_text("ledger_unavailable")
    # Station B's hold (B_HOLD_S) is shorter than the long cut: some of its jobs failed cleanly and resumed.
    b_failed = [r for r in stations["station-b"].results if r.reason == "ledger_unavailable"]
    assert b_failed, "the long cut should have outlasted station B's hold"

    inventory = [board_inventory(b, "finished") for hub in hubs.values() for b in hub.finished]
    for hub in hubs.values():
        for port in hub.ports():
            board = hub.board(port)
            if board is not None:
                inventory.append(board_inventory(board, f"port {port}"))
    made = sum(st.outcomes["provisioned"] for st in stations.values())
    counts = await asyncio.to_thread(check_invariants, direct_url, inventory, min_provisioned=made)
    assert await asyncio.to_thread(_open_jobs, direct_url) == 0
    assert await asyncio.to_thread(_recovered_entries, direct_url) >= 2
    # Every board a B job failed on for the outage was provisioned later (same board, same ID).
    with Ledger.open(direct_url) as ledger:
        for result in b_failed:
            if result.hw_serial is None or result.device_id is None:
                continue  # failed before its reservation: the board holds no ID, nothing to find
            record = ledger.find_by_serial(LOT, result.hw_serial)
            assert record is not None
            assert result.device_id in (None, record.device_id)
    print(
        f"postgres faults: {ROUNDS} x ({SHORT_CUT_S} s cut, {LONG_CUT_S} s cut), {BLACKHOLE_S} s blackhole, "
        "1 restart, "
        f"2 stations x {PORTS} ports: {counts}, proxy cuts {proxy.cuts}; "
        + "; ".join(f"{what}: {value:.2f}" for what, value in timeline if not what.startswith("progress"))
    )


def _board(line: Line) -> SimBoard:
    return SimBoard(firmware_key=line.fw_public, timing=BOARD_TIMING)


# -- a COMMIT whose reply is lost ----------------------------------------------------------------


@pytest.fixture
def proxied_ledger() -> Iterator[tuple[Ledger, TcpProxy, str]]:
    with throwaway_postgres_database() as direct_url:
        from sqlalchemy.engine import make_url

        target = make_url(direct_url)
        with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
            with Ledger.open(direct_url) as setup:
                setup.create_lot(
                    LOT,
                    customer="acme",
                    profile=LotProfile(id_format=TEST_ID_FORMAT),
                    target_quantity=None,
                    actor="t",
                )
                ids = "".join(f"DEV-{n:04d}\n" for n in range(10)).encode()
                setup.import_ids(LOT, ids, fmt="txt", actor="t")
                setup.set_lot_state(LOT, LotState.ACTIVE, actor="t")
            with Ledger.open(_via(direct_url, proxy)) as ledger:
                yield ledger, proxy, direct_url


def _restore_later(proxy: TcpProxy, delay_s: float) -> threading.Timer:
    timer = threading.Timer(delay_s, proxy.restore)
    timer.start()
    return timer


def _entries(ledger: Ledger, action: str, serial: str) -> int:
    """Audit entries of ``action`` whose details name ``serial``."""
    with ledger._engine.connect() as connection:  # the test reads the raw audit rows
        from sqlalchemy import text

        return int(
            connection.execute(
                text("SELECT count(*) FROM audit_entry WHERE action = :a AND details LIKE :s"),
                {"a": action, "s": f"%{serial}%"},
            ).scalar_one()
        )


def test_a_commit_whose_reply_is_lost_is_read_back_as_committed(
    proxied_ledger: tuple[Ledger, TcpProxy, str],
) -> None:
    ledger, proxy, _ = proxied_ledger
    serial = secrets.token_hex(8)
    proxy.cut_on(b"COMMIT", forward=True)  # the server commits; the reply never arrives
    timer = _restore_later(proxy, 1.0)
    reservation = ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    timer.join()
    assert proxy.pattern_cuts == 1
    record = ledger.find_by_serial(LOT, serial)
    assert record is not None
    assert record.device_id == reservation.device_id
    assert str(record.state) == "reserved"
    # Exactly one reservation happened (the call was not retried blindly), and the chain holds.
    assert _entries(ledger, "id.reserved", serial) == 1
    assert ledger.progress(LOT).reserved == 1
    ledger.verify_audit()


def test_a_commit_that_never_reached_the_server_is_reported_unavailable_then_retried(
    proxied_ledger: tuple[Ledger, TcpProxy, str],
) -> None:
    ledger, proxy, _ = proxied_ledger
    serial = secrets.token_hex(8)
    proxy.cut_on(b"COMMIT", forward=False)  # COMMIT dropped: the server aborts the transaction
    timer = _restore_later(proxy, 0.5)
    with pytest.raises(LedgerUnavailableError):
        ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    timer.join()
    assert ledger.find_by_serial(LOT, serial) is None  # nothing half-written
    reservation = ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    assert not reservation.resumed
    assert _entries(ledger, "id.reserved", serial) == 1
    ledger.verify_audit()


def test_an_unresolvable_commit_is_unknown_never_success(
    proxied_ledger: tuple[Ledger, TcpProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, proxy, _ = proxied_ledger
    monkeypatch.setattr(ledger_engine, "COMMIT_RESOLVE_TIMEOUT_S", 0.5)
    serial = secrets.token_hex(8)
    proxy.cut_on(b"COMMIT", forward=True)
    with pytest.raises(LedgerCommitUnknownError, match="whether it committed"):
        ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    proxy.restore()
    # Re-reading resolves it: the board's serial holds its ID (reserve resumes it, no second ID).
    again = ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    assert again.resumed
    assert ledger.progress(LOT).reserved == 1
    ledger.verify_audit()


# -- a one-statement write whose reply is lost (no COMMIT on the wire: autocommit) -----------------


def _warm_head(ledger: Ledger) -> None:
    """One claim through the transactional path, so the chain's head is remembered and the next
    reservation and provision are one autocommit statement each."""
    serial = secrets.token_hex(8)
    reservation = ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    ledger.mark_provisioned(
        LOT, reservation.device_id, serial, **_certificate(b"warm"), station="s1", port="1", actor="t"
    )
    assert "t" in ledger._head_hints


def _certificate(der: bytes) -> dict[str, str | bytes]:
    import hashlib

    return {"cert_der": der, "cert_serial": "01", "fingerprint_sha256": hashlib.sha256(der).hexdigest()}


def test_a_one_statement_reservation_whose_reply_is_lost_is_read_back(
    proxied_ledger: tuple[Ledger, TcpProxy, str],
) -> None:
    ledger, proxy, _ = proxied_ledger
    _warm_head(ledger)
    serial = secrets.token_hex(8)
    # The serial travels in the statement's parameters: the server runs it (and, autocommitting,
    # commits it); the reply never arrives. The read-back first ends the statement's server process.
    proxy.cut_on(serial.encode(), forward=True)
    timer = _restore_later(proxy, 0.5)
    reservation = ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    timer.join()
    assert proxy.pattern_cuts == 1
    assert not reservation.resumed
    record = ledger.find_by_serial(LOT, serial)
    assert record is not None
    assert record.device_id == reservation.device_id
    assert str(record.state) == "reserved"
    assert _entries(ledger, "id.reserved", serial) == 1  # not retried blindly
    # The head the server computed is not remembered: the next append re-reads it under lock.
    again = secrets.token_hex(8)
    ledger.reserve(LOT, again, station="s1", port="1", job_id=None, actor="t")
    ledger.verify_audit()


def test_a_one_statement_reservation_that_never_reached_the_server_is_unavailable_then_retried(
    proxied_ledger: tuple[Ledger, TcpProxy, str],
) -> None:
    ledger, proxy, _ = proxied_ledger
    _warm_head(ledger)
    serial = secrets.token_hex(8)
    proxy.cut_on(serial.encode(), forward=False)
    timer = _restore_later(proxy, 0.5)
    with pytest.raises(LedgerUnavailableError):
        ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    timer.join()
    assert ledger.find_by_serial(LOT, serial) is None  # nothing half-written
    reservation = ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    assert not reservation.resumed
    assert _entries(ledger, "id.reserved", serial) == 1
    ledger.verify_audit()


def test_a_one_statement_provision_whose_reply_is_lost_is_read_back(
    proxied_ledger: tuple[Ledger, TcpProxy, str],
) -> None:
    ledger, proxy, _ = proxied_ledger
    _warm_head(ledger)
    serial = secrets.token_hex(8)
    reservation = ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    certificate = _certificate(serial.encode())
    proxy.cut_on(str(certificate["fingerprint_sha256"]).encode(), forward=True)
    timer = _restore_later(proxy, 0.5)
    ledger.mark_provisioned(
        LOT, reservation.device_id, serial, **certificate, station="s1", port="1", actor="t"
    )
    timer.join()
    assert proxy.pattern_cuts == 1
    record = ledger.find_by_serial(LOT, serial)
    assert record is not None
    assert str(record.state) == "provisioned"
    assert _entries(ledger, "id.provisioned", serial) == 1
    ledger.verify_audit()


def test_a_one_statement_write_lost_in_an_outage_is_unavailable_and_its_retry_reads_it_back(
    proxied_ledger: tuple[Ledger, TcpProxy, str],
) -> None:
    """Not answered within STATEMENT_RESOLVE_TIMEOUT_S: the station is told at once (and pauses)."""
    ledger, proxy, _ = proxied_ledger
    _warm_head(ledger)
    serial = secrets.token_hex(8)
    proxy.cut_on(serial.encode(), forward=True)
    began = time.monotonic()
    with pytest.raises(LedgerUnavailableError, match="read when it is retried"):
        ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    assert time.monotonic() - began < ledger_engine.COMMIT_RESOLVE_TIMEOUT_S  # not the COMMIT's patience
    proxy.restore()
    again = ledger.reserve(LOT, serial, station="s1", port="1", job_id=None, actor="t")
    assert again.resumed  # it had committed: the serial holds its ID, no second one
    assert _entries(ledger, "id.reserved", serial) == 1
    ledger.verify_audit()
