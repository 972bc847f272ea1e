"""`factoryd demo`: a whole simulated line, end to end, with nothing to set up.

It makes a customer PKI and a signed firmware image, creates a lot with an ID list in an
SQLite ledger, runs the real daemon on a simulated hub whose boards sit behind real PTYs,
then exports the signed manifest, verifies the audit chain and every certificate, and prints
what happened.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.config import Settings, load_settings
from factoryd.daemon import Daemon, DaemonHooks, sim_board_factory
from factoryd.errors import VerificationError
from factoryd.firmware import FirmwareStore, sign_firmware
from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger
from factoryd.ledger.model import DeviceRecord, LotState
from factoryd.ledger.profile import LotProfile
from factoryd.pki.store import BundleStore
from factoryd.pki.testca import make_test_pki
from factoryd.protocol.messages import ObjectId
from factoryd.service import StationPaths, export_manifest, parse_bundle, store_bundle, write_manifest
from factoryd.sim.arduino import SimArduinoBoard
from factoryd.sim.board import SimBoard
from factoryd.sim.hub import SimHub

log = structlog.get_logger(__name__)

DEMO_LOT = "demo-lot"
# Arduino's provisioning sketch talks at 57600 baud (ARDUINO_V1.md).
ARDUINO_BAUDRATE = 57600
DEMO_FW_VERSION = "2.0.0"
# How often the simulated operator looks at the fixture.
OPERATOR_LOOK_S = 0.1
# Spare IDs beyond the boards, so a few voided or failed boards do not exhaust the lot.
ID_MARGIN = 1.25


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    ports: int = 8
    boards: int = 24
    fault_rate: float = 0.0
    seed: int = 1
    timing: Literal["zero", "realistic"] = "zero"
    timing_scale: float = 1.0
    profile: Literal["factoryd-v1", "arduino-v1"] = "factoryd-v1"
    lock: bool = True
    flash: bool = True
    state_dir: Path | None = None
    ledger_url: str | None = None
    metrics: bool = False
    mqtt: bool = False
    log_level: str = "warning"
    # Serve the HTTP API and the station page on 127.0.0.1:<port> (None: not at all).
    api_port: int | None = None
    # Show a live view of the ports on the terminal (rich).
    live_view: bool = False


@dataclass
class DemoResult:
    """What the demo measured and checked."""

    state_dir: Path
    outcomes: dict[str, int]
    provisioned: int
    audit_entries: int
    manifest_path: Path
    signature_path: Path
    manifest_count: int
    certificates_verified: int
    elapsed_s: float
    devices_per_hour: float
    devices: int = 0
    duplicate_ids: int = 0
    # Mean modelled physical time per finished board, and the first-job-to-last-job window.
    physical_s_mean: float = 0.0
    window_s: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "devices": self.devices,
            "failed": sum(v for k, v in self.outcomes.items() if k in ("failed", "refused")),
            "duplicate_ids": self.duplicate_ids,
            "certs_verified": self.certificates_verified,
            "state_dir": str(self.state_dir),
            "outcomes": self.outcomes,
            "provisioned": self.provisioned,
            "audit_entries": self.audit_entries,
            "manifest": str(self.manifest_path),
            "manifest_signature": str(self.signature_path),
            "manifest_count": self.manifest_count,
            "certificates_verified": self.certificates_verified,
            "elapsed_s": round(self.elapsed_s, 3),
            "devices_per_hour": round(self.devices_per_hour, 1),
            "failures": self.failures,
        }


def demo_settings(options: DemoOptions, state_dir: Path) -> Settings:
    """Settings of the simulated station."""
    return load_settings(
        None,
        station={"name": "demo-station", "line": "demo-line", "state_dir": state_dir},
        ledger={"url": options.ledger_url},
        hub={
            "backend": "sim",
            "max_powered": options.ports,
            "power_cycle_off_s": 0.0 if options.timing == "zero" else 0.5,
            "power_on_stagger_s": 0.0 if options.timing == "zero" else 0.01,
            "sim": {
                "ports": options.ports,
                "boards": options.boards,
                "fault_rate": options.fault_rate,
                "fault_seed": options.seed,
                "timing": options.timing,
                "timing_scale": options.timing_scale,
            },
        },
        jobs={
            "lot": DEMO_LOT,
            "rescan_s": 0.2,
            "reply_timeout_scale": 0.2 if options.timing == "zero" else 1.0,
            "backoff_initial_s": 0.01,
        },
        metrics={"enabled": options.metrics},
        # The demo serves the API and station page only when asked (port 8080 may be taken).
        api={"enabled": options.api_port is not None, "port": options.api_port or 0},
        mqtt={"enabled": options.mqtt},
        log={"level": options.log_level, "format": "console"},
    )


def prepare_lot(options: DemoOptions, settings: Settings, passphrase: bytes) -> ec.EllipticCurvePublicKey:
    """Create the demo lot: PKI, bundle, firmware, ID list; return the firmware-signing public key."""
    paths = StationPaths(settings.station.state_dir)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    upload_passphrase = secrets.token_urlsafe(16).encode()
    pki = make_test_pki(profile_kind=options.profile, passphrase=upload_passphrase)
    fw_key = ec.generate_private_key(ec.SECP256R1())
    image = b"factoryd demo application firmware " + DEMO_FW_VERSION.encode() + bytes(range(256)) * 64
    firmware = sign_firmware(image, DEMO_FW_VERSION, fw_key)
    # The Arduino sketch has no firmware-update or lock command (it locks its config zone itself).
    flash = options.flash and options.profile == "factoryd-v1"
    profile = LotProfile(
        protocol=options.profile,
        lock=options.lock and options.profile == "factoryd-v1",
        firmware_sha256=firmware.sha256.hex() if flash else None,
        firmware_version=DEMO_FW_VERSION if flash else None,
    )
    ids = "\n".join(str(uuid.uuid4()) for _ in range(max(1, int(options.boards * ID_MARGIN) + 1)))
    with Ledger.open(settings.ledger_url) as ledger:
        lot = ledger.create_lot(
            DEMO_LOT, customer="demo-customer", profile=profile, target_quantity=options.boards, actor="demo"
        )
        bundle = parse_bundle(pki.pkcs12, upload_passphrase, lot)
        store_bundle(paths, passphrase, DEMO_LOT, bundle)
        if flash:
            FirmwareStore(paths.firmware).save(DEMO_LOT, firmware, fw_key.public_key())
        ledger.import_ids(DEMO_LOT, ids.encode(), filename="demo-ids.txt", actor="demo")
        ledger.set_lot_state(DEMO_LOT, LotState.ACTIVE, actor="demo")
    return fw_key.public_key()


async def run_demo(options: DemoOptions) -> DemoResult:
    """Run the demo; returns what it measured and verified."""
    state_dir = options.state_dir or Path(tempfile.mkdtemp(prefix="factoryd-demo-"))
    settings = demo_settings(options, state_dir)
    passphrase = secrets.token_urlsafe(24).encode()
    fw_public = await asyncio.to_thread(prepare_lot, options, settings, passphrase)

    base_factory = sim_board_factory(settings)

    def board_factory() -> SimBoard:
        board = base_factory()
        if options.profile == "arduino-v1":
            # Arduino's sketch: its own board model, serial line at 57600 baud.
            timing = (
                replace(board.timing, baudrate=ARDUINO_BAUDRATE) if board.timing.baudrate else board.timing
            )
            return SimArduinoBoard(faults=board.faults, timing=timing)
        board.firmware_key = fw_public
        return board

    hub = SimHub(options.ports, board_factory, supply=options.boards)

    def finished(_station: Station) -> bool:
        return hub.exhausted

    started = time.monotonic()
    hooks = DaemonHooks(hub=hub, passphrase=passphrase, stop_when=finished)
    daemon = Daemon(settings, hooks)

    async def operator(station: Station) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(simulated_operator(station))
            if options.live_view:
                from factoryd.demo_view import show  # noqa: PLC0415 - terminal only

                tg.create_task(show(daemon.live, station, options.boards))

    hooks.on_ready = operator
    station = await daemon.run()
    elapsed = time.monotonic() - started
    return await asyncio.to_thread(_verify, settings, passphrase, station, hub.finished, elapsed)


def board_identity(board: SimBoard) -> str:
    """The serial the station keys a board's reservation on."""
    if isinstance(board, SimArduinoBoard):
        return f"usb:{board.usb_serial.lower()}"
    return board.serial_hex


def stored_certificate(board: SimBoard) -> bytes | None:
    """The certificate a board holds (an Arduino board rebuilds it from its compressed slots)."""
    if isinstance(board, SimArduinoBoard):
        return board.rebuilt_certificate()
    return board.se.objects.get(ObjectId.DEVICE_CERT)


def stored_device_id(board: SimBoard) -> str | None:
    """The device ID a board holds."""
    if isinstance(board, SimArduinoBoard):
        return board.stored_device_id()
    raw = board.se.objects.get(ObjectId.DEVICE_ID)
    return raw.decode() if raw is not None else None


async def simulated_operator(station: Station) -> None:
    """What the person at the fixture does in the demo: look at a port in attention, then acknowledge it.

    Without this a port that failed a few boards in a row would wait for a human forever, and
    the simulated supply would never run out.
    """
    while not station.stopping:
        for port, control in station.ports.items():
            if control.attention is not None:
                log.info("simulated operator acknowledges", port=port, reason=control.attention)
                station.acknowledge(port)
        await asyncio.sleep(OPERATOR_LOOK_S)


def check_provisioned(
    record: DeviceRecord, issuing_ca: x509.Certificate, boards: dict[str, SimBoard]
) -> None:
    """Check one provisioned device end to end; raise VerificationError naming what is wrong."""
    cert = x509.load_der_x509_certificate(record.cert_der or b"")
    cert.verify_directly_issued_by(issuing_ca)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    board = boards.get(record.hw_serial or "")
    if cn != record.device_id or board is None:
        raise VerificationError(f"{record.device_id}: CN {cn!r} or board {record.hw_serial} does not match")
    if stored_certificate(board) != record.cert_der:
        raise VerificationError(f"{record.device_id}: board {record.hw_serial} holds another certificate")
    key = cert.public_key()
    point = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    if not isinstance(key, ec.EllipticCurvePublicKey) or point != board.se.public_point(0):
        raise VerificationError(f"{record.device_id}: certificate key is not the secure element's key")


def _verify(
    settings: Settings, passphrase: bytes, station: Station, boards: list[SimBoard], elapsed: float
) -> DemoResult:
    paths = StationPaths(settings.station.state_dir)
    with Ledger.open(settings.ledger_url) as ledger:
        audit_entries = ledger.verify_audit()
        devices = ledger.provisioned_devices(DEMO_LOT)
        manifest = export_manifest(ledger, paths, passphrase, DEMO_LOT)
    json_path, sig_path = write_manifest(manifest, paths.manifests)
    issuing_ca = BundleStore(paths.bundles, passphrase).load(DEMO_LOT).certificate
    by_serial = {board_identity(b): b for b in boards}
    for record in devices:
        check_provisioned(record, issuing_ca, by_serial)
    verified = len(devices)
    on_boards = Counter(device_id for b in boards if (device_id := stored_device_id(b)))
    failures: dict[str, int] = {}
    for result in station.results:
        if result.outcome in ("failed", "refused"):
            key = result.reason or "unknown"
            failures[key] = failures.get(key, 0) + 1
    provisioned = len(devices)
    return DemoResult(
        state_dir=settings.station.state_dir,
        outcomes=dict(station.outcomes),
        provisioned=provisioned,
        audit_entries=audit_entries,
        manifest_path=json_path,
        signature_path=sig_path,
        manifest_count=manifest.count,
        certificates_verified=verified,
        elapsed_s=elapsed,
        devices_per_hour=provisioned / elapsed * 3600 if elapsed > 0 else 0.0,
        devices=len(boards),
        duplicate_ids=sum(1 for n in on_boards.values() if n > 1),
        physical_s_mean=sum(b.physical_s for b in boards) / len(boards) if boards else 0.0,
        window_s=(station.last_job_at - station.first_job_at)
        if station.first_job_at is not None and station.last_job_at is not None
        else 0.0,
        failures=failures,
    )
