"""Fault 4: the station clock steps (an NTP correction by minutes or years, forwards or backwards).

Timeouts run on the monotonic clock, so a step neither fires nor stretches them. Certificates are
never issued from a clock that is obviously wrong: before this release's date, before the CA's
notBefore or after its notAfter, the station pauses intake with the reason ``station_clock``
(no ID reserved, no board failed for it) and resumes by itself once the clock is right. The audit
trail keeps its order by sequence number and records a step back once (``clock.stepped_back``).

The station process's clock is stepped for real with libfaketime (Debian ``libfaketime``): an
LD_PRELOAD library that offsets CLOCK_REALTIME by what a file says, re-read on every call
(``FAKETIME_NO_CACHE=1``), while CLOCK_MONOTONIC stays real (``FAKETIME_DONT_FAKE_MONOTONIC=1``).
That is what NTP's step does to a running daemon, with no hook in factoryd; an injected clock
would only test the code paths that take one. (libfaketime 0.9.10 breaks ``time.sleep`` with
EINVAL in the preloaded process; the SQLite station never calls it.)

CI runs one forward and one backward step on a short line; ``FAULTS_LONG=1`` a longer line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import glob
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from factoryd.errors import StationClockError
from factoryd.ledger import Ledger
from factoryd.ledger import engine as ledger_engine
from factoryd.pki import issuer as issuer_module
from factoryd.pki.issuer import RELEASE_DATE, Issuer
from factoryd.pki.profile import CertProfile
from factoryd.pki.signer import SoftwareSigner
from factoryd.pki.testca import make_test_pki
from factoryd.sim.remote import RemoteSimHub
from tests.helpers.line_procs import (
    check_invariants,
    provisioned_count,
    spawn,
    spawn_hub,
    stop,
    wait_for,
    write_config,
)
from tests.helpers.station import LOT, make_line

LONG = os.environ.get("FAULTS_LONG") == "1"
BOARDS = 80 if LONG else 24
PORTS = 8 if LONG else 4
# How long the clock stays wrong (the station must stay paused all that time).
WRONG_FOR_S = 6.0 if LONG else 1.5
TEN_YEARS_S = 10 * 365 * 86400
LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
ROOT = Path(__file__).resolve().parent.parent


def _issuer() -> Issuer:
    pki = make_test_pki(passphrase=b"clock-test")
    return Issuer(SoftwareSigner(pki.issuing_key, pki.issuing_cert), [pki.issuing_cert], CertProfile())


@pytest.mark.faults
def test_issuer_refuses_an_obviously_wrong_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = _issuer()
    ca = issuer.chain[0]
    issuer.check_clock()  # the machine's clock is fine
    with pytest.raises(StationClockError, match="before the CA certificate becomes valid"):
        issuer.check_clock(ca.not_valid_before_utc - dt.timedelta(minutes=1))
    with pytest.raises(StationClockError, match="after the CA certificate expired"):
        issuer.check_clock(ca.not_valid_after_utc + dt.timedelta(days=1))
    # A station clock (no explicit time) before this release: a dead RTC battery, a wrong NTP step.
    monkeypatch.setattr(
        issuer_module, "utc_now", lambda now=None: now or dt.datetime(2016, 5, 1, tzinfo=dt.UTC)
    )
    with pytest.raises(StationClockError, match=r"before this factoryd release \(2026-12-01\)") as info:
        issuer.check_clock()
    assert info.value.reason == "station_clock"


@pytest.mark.faults
def test_release_date_is_not_after_the_newest_commit() -> None:
    try:
        out = subprocess.run(  # noqa: S603 - fixed git invocation on our own tree
            ["git", "-C", str(ROOT), "log", "-1", "--format=%cI"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git history to compare the release date with")
    newest = dt.datetime.fromisoformat(out).astimezone(dt.UTC)
    # Raising RELEASE_DATE past the code it ships with would refuse a correct clock.
    assert newest.date() >= RELEASE_DATE.date()


@pytest.mark.faults
def test_audit_records_a_step_back_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    times = iter(
        [
            dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC),
            dt.datetime(2026, 12, 1, 12, 5, tzinfo=dt.UTC),
            dt.datetime(2026, 12, 1, 11, 0, tzinfo=dt.UTC),  # NTP steps the clock back 65 min
            dt.datetime(2026, 12, 1, 11, 1, tzinfo=dt.UTC),
        ]
    )
    monkeypatch.setattr(ledger_engine, "utc_now", lambda: next(times))
    with Ledger.open(url) as ledger:
        for n in range(4):
            ledger.audit(actor="st1", action="test.event", subject=f"e{n}", details={})
        assert ledger.verify_audit() == 5
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = db.execute("SELECT action, subject, details FROM audit_entry ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ["test.event"] * 2 + ["clock.stepped_back"] + ["test.event"] * 2
    assert '"stepped_back_s":3900.0' in rows[2][2]


def _faketime_env(offset_file: Path) -> dict[str, str]:
    return {
        "LD_PRELOAD": LIBFAKETIME[0],
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def _step(offset_file: Path, offset_s: int) -> None:
    # Written whole and renamed: the preloaded library re-reads the file on every clock call.
    tmp = offset_file.with_suffix(".tmp")
    tmp.write_text(f"{offset_s:+d}\n")
    tmp.replace(offset_file)


@pytest.mark.faults
@pytest.mark.skipif(not LIBFAKETIME, reason="libfaketime is not installed (apt-get install libfaketime)")
@pytest.mark.timeout(300 if LONG else 90)
async def test_station_process_rides_out_clock_steps(tmp_path: Path) -> None:
    line = await make_line(tmp_path, boards=BOARDS, ports=PORTS)
    url = line.settings.ledger_url
    socket = tmp_path / "hub.sock"
    log = tmp_path / "processes.log"
    hub_proc = spawn_hub(tmp_path, socket, ports=PORTS, boards=BOARDS, fault_rate=0.0, seed=5, log=log)
    offset = tmp_path / "faketime"
    _step(offset, 0)
    env = {"FACTORYD_CA_PASSPHRASE": line.passphrase.decode(), **_faketime_env(offset)}
    config = write_config(tmp_path / "factoryd.toml", line, socket, ports=PORTS)
    hub = RemoteSimHub(socket)

    async def count() -> int:
        return await asyncio.to_thread(provisioned_count, url)

    try:
        await hub.connect(timeout_s=20)
        daemon = spawn(["run", "-c", str(config)], log, env)

        async def reached(goal: int) -> bool:
            return await count() >= goal

        await wait_for(lambda: reached(BOARDS // 4), 60, "the first boards")
        # Forwards by 30 minutes: nothing times out, nothing pauses (the clock is still plausible).
        _step(offset, 1800)
        await wait_for(lambda: reached(BOARDS // 2), 60, "boards after the forward step")
        assert "intake paused" not in log.read_text()
        # Backwards by ten years: before the release and the CA. Intake pauses, nothing is issued.
        _step(offset, -TEN_YEARS_S)

        async def paused() -> bool:
            return "station_clock" in log.read_text() and "intake paused" in log.read_text()

        await wait_for(paused, 30, "the station to pause for its clock")
        await asyncio.sleep(0.5)  # jobs in flight end
        held = await count()
        await asyncio.sleep(WRONG_FOR_S)
        assert await count() == held, "no certificate may be issued while the clock is wrong"
        # NTP puts it right: the station resumes by itself, in the same process.
        _step(offset, 0)

        async def exhausted() -> bool:
            return bool((await hub.status())["exhausted"])

        await wait_for(exhausted, 120, "the hub's supply to be used up after the clock is right")
        assert daemon.poll() is None, "the station process must not have restarted"
        assert await stop(daemon) == 0, log.read_text()[-3000:]
        inventory = await hub.inventory()
    finally:
        await stop(hub_proc)
    text = log.read_text()
    assert "intake resumed" in text
    assert "board_timeout" not in text  # the steps fired no timeout
    assert len(inventory) == BOARDS
    check_invariants(url, inventory, min_provisioned=BOARDS - PORTS)
    with Ledger.open(url) as ledger:
        devices = ledger.provisioned_devices(LOT)
    # No certificate starts before this release or before its CA: none came from the wrong clock.
    ca_start = line_ca_not_before(tmp_path)
    for device in devices:
        assert device.cert_der is not None
        cert = x509.load_der_x509_certificate(device.cert_der)
        assert cert.not_valid_before_utc >= max(RELEASE_DATE, ca_start)
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        steps = db.execute("SELECT details FROM audit_entry WHERE action = 'clock.stepped_back'").fetchall()
    assert steps, "the step back is recorded in the audit trail"


def line_ca_not_before(state_dir: Path) -> dt.datetime:
    """The lot CA's notBefore (the demo set-up keeps the CA certificate beside the bundle)."""
    starts = []
    for pem in state_dir.rglob("*.pem"):
        data = pem.read_bytes()
        if b"BEGIN CERTIFICATE" not in data:
            continue
        for cert in x509.load_pem_x509_certificates(data):
            starts.append(cert.not_valid_before_utc)
    return min(starts) if starts else RELEASE_DATE
