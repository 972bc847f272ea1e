"""Fault: the disk under the SQLite ledger and the state directory fills up, then space returns.

The station's state directory (SQLite ledger, CA bundles, firmware, manifests) lives on a small tmpfs
the test mounts (so ENOSPC is the kernel's own, as on a full disk) and fills with a file mid-run.
Commits that fail are never taken for success: the station pauses intake with the reason
``ledger_storage_full``, jobs in flight wait at their safe point, and when the filler is removed the
station resumes by itself. Writes into the state directory on the full disk fail whole: no bundle,
firmware image or manifest is half written. Afterwards the ledger and the boards agree (0 duplicates,
0 lost, certificates match the boards, no open job, audit chain verifies).

Needs root (mount); CI runs as root. FAULTS_LONG=1 runs more boards and fills the disk more often.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from factoryd.config import Settings, load_settings
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.firmware import FirmwareStore
from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger
from factoryd.pki.store import BundleStore
from factoryd.service import StationPaths, export_manifest, write_manifest
from factoryd.sim.board import SimBoard, Timing
from factoryd.sim.hub import SimHub
from factoryd.sim.remote import board_inventory
from factoryd.telemetry.events import RecordingSink
from factoryd.telemetry.reasons import reason_text
from tests.helpers.line_procs import check_invariants
from tests.helpers.station import LOT, Line, make_line

pytestmark = pytest.mark.faults

LONG = os.environ.get("FAULTS_LONG") == "1"
PORTS = 6 if LONG else 3
FILLS = 4 if LONG else 1
FULL_FOR_S = 10.0 if LONG else 1.5
BETWEEN_FAULTS = 6 if LONG else 3
# Room for the lot (IDs, bundle, firmware) and a few hundred boards; small enough to fill in a moment.
TMPFS_SIZE = "24m"
FILL_CHUNK_BYTES = 1 << 20
BOARD_TIMING = Timing(boot_s=0.02, keygen_s=0.06, csr_s=0.01, sign_s=0.02, write_s=0.02, enumerate_s=0.05)
PROGRESS_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 600.0 if LONG else 120.0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of TMPFS_SIZE mounted under tmp_path (skipped, saying why, where mounting is not allowed)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(  # noqa: S603 - fixed arguments
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point)],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)  # noqa: S603, S607


def fill(disk: Path) -> Path:
    """Fill the file system to the last byte with one file; returns it (unlink it to free the space)."""
    filler = disk / "filler.bin"
    chunk = FILL_CHUNK_BYTES
    with filler.open("ab", buffering=0) as out:
        while chunk >= 1:
            try:
                out.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    return filler


def _settings(line: Line) -> Settings:
    return load_settings(
        None,
        station={"name": "disk-station", "line": "faults", "state_dir": line.settings.station.state_dir},
        ledger={"url": line.settings.ledger_url},
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


def _open_jobs(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        row = connection.execute("SELECT count(*) FROM job WHERE finished_at IS NULL").fetchone()
        return int(row[0])


def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the filler (empty parent directories do not count)."""
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != "filler.bin"
    )


@pytest.mark.timeout(900 if LONG else 180)
async def test_a_full_disk_pauses_the_station_and_it_resumes_when_space_returns(small_disk: Path) -> None:
    line = await make_line(small_disk, boards=2000 if LONG else 400, ports=PORTS)
    hub = SimHub(PORTS, lambda: SimBoard(firmware_key=line.fw_public, timing=BOARD_TIMING))
    sink = RecordingSink()
    finished = asyncio.Event()
    holder: list[Station] = []
    timeline: list[tuple[str, float]] = []

    async def on_ready(station: Station) -> None:
        holder.append(station)

    def made() -> int:
        return holder[0].outcomes["provisioned"] if holder else 0

    async def until(predicate: object, what: str) -> None:
        deadline = time.monotonic() + PROGRESS_TIMEOUT_S
        while not predicate():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def schedule() -> None:
        try:
            await until(lambda: made() >= BETWEEN_FAULTS, "the first boards")
            for _ in range(FILLS):
                filler = await asyncio.to_thread(fill, small_disk)
                filled = time.monotonic()
                station = holder[0]
                await until(lambda st=station: "ledger" in st.pauses, "the station to notice the full disk")
                timeline.append(("paused after the disk filled (s)", time.monotonic() - filled))
                assert station.pauses["ledger"].reason == "ledger_storage_full"
                await asyncio.sleep(FULL_FOR_S)
                await _state_dir_writes_fail_whole(line, small_disk)
                filler.unlink()
                freed = time.monotonic()
                await until(lambda st=station: not st.intake_paused, "intake to resume")
                timeline.append(("resumed after space returned (s)", time.monotonic() - freed))
                base = made()
                await until(lambda b=base: made() >= b + BETWEEN_FAULTS, "boards after space returned")
        finally:
            finished.set()

    hooks = DaemonHooks(
        hub=hub,
        passphrase=line.passphrase,
        stop_when=lambda _station: finished.is_set(),
        on_ready=on_ready,
        extra_sinks=(sink,),
    )
    daemon = Daemon(_settings(line), hooks)
    async with asyncio.timeout(RUN_TIMEOUT_S), asyncio.TaskGroup() as tg:
        scheduled = tg.create_task(schedule())
        tg.create_task(daemon.run())
    scheduled.result()

    station = holder[0]
    assert not station.pauses
    assert all(c.attention is None for c in station.ports.values()), station.ports
    assert daemon.ledger_hold is not None
    assert daemon.ledger_hold.recoveries == FILLS
    # The operator saw it in plain words on the held ports (and MQTT's port state carries the same).
    assert any(u.reason == "ledger_storage_full" for u in sink.ports)
    assert "disk" in reason_text("ledger_storage_full").lower()
    # No job of this station failed for the disk: they waited at their safe point.
    assert not [r for r in station.results if r.reason == "ledger_storage_full"]

    inventory = [board_inventory(b, "finished") for b in hub.finished]
    inventory += [board_inventory(b, p) for p in hub.ports() if (b := hub.board(p)) is not None]
    url = line.settings.ledger_url
    counts = await asyncio.to_thread(check_invariants, url, inventory, min_provisioned=made())
    assert _open_jobs(small_disk / "ledger.db") == 0
    # With space back, every state-directory write works again (and wrote each file whole).
    await _state_dir_writes_work(line)
    print(f"disk faults: {FILLS} fills of {FULL_FOR_S} s, {PORTS} ports: {counts}; {timeline}")


async def _state_dir_writes_fail_whole(line: Line, disk: Path) -> None:
    """On the full disk: a bundle, a firmware image and a manifest are refused whole, nothing is left."""
    paths = StationPaths(line.settings.station.state_dir)
    before = _files(disk)
    bundles = BundleStore(paths.bundles, line.passphrase)
    bundle = await asyncio.to_thread(bundles.load, LOT)
    with pytest.raises(OSError, match="No space left") as bundle_error:
        await asyncio.to_thread(bundles.save, "lot-2", bundle)
    assert bundle_error.value.errno == errno.ENOSPC
    image, key = _lot_image(paths)
    with pytest.raises(OSError, match="No space left"):
        await asyncio.to_thread(FirmwareStore(paths.firmware).save, "lot-2", image, key)
    with Ledger.open(line.settings.ledger_url) as ledger:
        manifest = await asyncio.to_thread(export_manifest, ledger, paths, line.passphrase, LOT)
    with pytest.raises(OSError, match="No space left"):
        await asyncio.to_thread(write_manifest, manifest, paths.state_dir / "manifests")
    # Nothing half-written: not a staging directory, not a temp file, not a truncated file.
    after = _files(disk)
    assert after == before, set(after) ^ set(before)


async def _state_dir_writes_work(line: Line) -> None:
    paths = StationPaths(line.settings.station.state_dir)
    bundles = BundleStore(paths.bundles, line.passphrase)
    bundle = await asyncio.to_thread(bundles.load, LOT)
    await asyncio.to_thread(bundles.save, "lot-2", bundle)
    assert (await asyncio.to_thread(bundles.load, "lot-2")).certificate == bundle.certificate
    image, key = _lot_image(paths)
    stored = await asyncio.to_thread(FirmwareStore(paths.firmware).save, "lot-2", image, key)
    assert FirmwareStore(paths.firmware).load("lot-2", stored.image.hash) is not None
    with Ledger.open(line.settings.ledger_url) as ledger:
        manifest = await asyncio.to_thread(export_manifest, ledger, paths, line.passphrase, LOT)
    json_path, sig_path = await asyncio.to_thread(write_manifest, manifest, paths.state_dir / "manifests")
    assert json_path.read_bytes() == manifest.json_bytes
    assert sig_path.read_bytes() == manifest.signature_der


def _lot_image(paths: StationPaths) -> tuple[bytes, object]:
    """The demo lot's stored firmware image and its signing key (to store it again under another lot)."""
    image_file = next((paths.firmware / LOT).glob("*/image.bin"))
    key = load_pem_public_key((image_file.parent / "signing-key.pem").read_bytes())
    return image_file.read_bytes(), key
