"""`factoryd demo`: a whole simulated line, end to end, with nothing to set up.

It makes a customer PKI and an MCUboot firmware image, creates a lot with an ID list in an
SQLite ledger, runs the real daemon on a simulated hub whose boards sit behind real PTYs,
then exports the signed manifest, verifies the audit chain and every certificate, and prints
what happened.

A demo's state directory is a station's like any other: it holds a config file
(``factoryd.toml``) naming that directory and its ledger, and the CA passphrase the demo made
(``ca-passphrase``, 0600) unless ``FACTORYD_CA_PASSPHRASE`` gave one. Without ``--state-dir`` the
demo works in a temporary directory and removes it at the end.

Reproducibility: the simulated board at position n of the supply (the n-th board the operator
feeds in) draws its secure-element serial and all its faults from (seed, lot, n) alone, so the
same seed gives the same boards, the same faults, the same outcome per board and the same failure
reasons, whichever port a board lands on and however the ports interleave. What still varies:
device IDs (drawn at random for the lot, and handed out in the order boards reach reservation),
keys and certificates, timings, and the order of results.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import secrets
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from factoryd.api.tokens import Role, TokenStore
from factoryd.config import Settings, load_settings
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.errors import ConfigError, LotNotFoundError, VerificationError
from factoryd.files import write_private
from factoryd.firmware import FirmwareStore, store_lot_firmware
from factoryd.jobs.profiles import board_profile
from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger
from factoryd.ledger.model import LotInfo, LotState, ProvisionedDevice
from factoryd.ledger.profile import LotProfile
from factoryd.matter.admin import setup_matter_lot
from factoryd.matter.profile import PBKDF_MIN_ITERATIONS, MatterProfile
from factoryd.matter.testing import TEST_PRODUCT_ID, TEST_VENDOR_ID, make_matter_test_pki
from factoryd.pki.passphrase import DEFAULT_PASSPHRASE_ENV
from factoryd.pki.store import BundleStore
from factoryd.pki.testca import make_test_pki
from factoryd.protocol.messages import ObjectId
from factoryd.protocol.nrf91 import NRF_CLOUD_SEC_TAG
from factoryd.service import (
    StationPaths,
    export_manifest,
    parse_bundle,
    store_attestation_roots,
    store_bundle,
    write_manifest,
)
from factoryd.sim.arduino import SimArduinoBoard
from factoryd.sim.board import FaultPlan, Impostor, SimBoard, Timing, equip_attestation
from factoryd.sim.bootloader import DEFAULT_SLOT_BYTES
from factoryd.sim.hub import SimHub
from factoryd.sim.mcuboot_signer import sign_image
from factoryd.sim.mcumgr import McumgrTiming, SimMcumgrBoard
from factoryd.sim.nrf91 import SimNrf91Modem, nrf91_timing
from factoryd.sim.printer import printed_labels, printer_settings, start_printers, stop_printers
from factoryd.sim.secure_element import SimSecureElement, SimVendorCa, seeded_se_serial
from factoryd.telemetry.figures import FAILED_OUTCOMES, JobCounts, Rate

log = structlog.get_logger(__name__)

DEMO_LOT = "demo-lot"
# Profiles whose firmware updates its image and locks its secure element (the Arduino sketch does neither).
SECURE_ELEMENT_PROFILES = ("factoryd-v1", "mcumgr")
# Arduino's provisioning sketch talks at 57600 baud (ARDUINO_V1.md).
ARDUINO_BAUDRATE = 57600
DEMO_FW_VERSION = "2.0.0"
# How often the simulated operator looks at the fixture.
OPERATOR_LOOK_S = 0.1
# Spare IDs beyond the boards, so a few voided or failed boards do not exhaust the lot.
ID_MARGIN = 1.25
# Files the demo leaves in its state directory.
CONFIG_FILE = "factoryd.toml"
PASSPHRASE_FILE = "ca-passphrase"  # noqa: S105 - a file name
SUPERVISOR_TOKEN_FILE = "supervisor.token"  # noqa: S105 - a file name
OPERATOR_TOKEN_FILE = "operator.token"  # noqa: S105 - a file name
STATION_NAME = "demo-station"
LINE_NAME = "demo-line"
DEMO_RUNS_FILE = "demo-runs.json"
DEFAULT_METRICS_PORT = 9464
USB_SERIAL_BYTES = 16


@dataclass(frozen=True)
class DemoStarted:
    """Where to find a running demo: its files, and the page and API while it runs."""

    state_dir: Path
    config_path: Path
    temporary: bool
    passphrase_file: Path | None
    page_url: str | None = None
    operator_token: str | None = None
    supervisor_token_file: Path | None = None
    metrics_url: str | None = None


# The board profiles the demo (and the line benchmarks) can simulate: every registered one.
# "matter" is a factoryd-v1 line making Matter devices (a test PAA/PAI/CD; docs/matter.md).
DemoProfile = Literal["factoryd-v1", "arduino-v1", "mcumgr", "nrf91-at", "matter"]
DEMO_PROFILES: tuple[DemoProfile, ...] = get_args(DemoProfile)
MATTER_DEMO_PROTOCOL = "factoryd-v1"
# The demo's customer key the onboarding codes are encrypted to (decrypt them with openssl cms).
MATTER_CUSTOMER_KEY_FILE = "matter-customer-key.pem"
MATTER_CUSTOMER_CERT_FILE = "matter-customer.pem"


def demo_protocol(profile: DemoProfile) -> str:
    """The board protocol a demo profile runs."""
    return MATTER_DEMO_PROTOCOL if profile == "matter" else profile


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    ports: int = 8
    boards: int = 24
    fault_rate: float = 0.0
    seed: int = 1
    timing: Literal["zero", "realistic"] = "zero"
    timing_scale: float = 1.0
    profile: DemoProfile = "factoryd-v1"
    lock: bool = True
    flash: bool = True
    # Genuine parts only: the lot requires key attestation to the demo's test SE vendor, and this
    # share of the supply are impostors (clones, forgeries, replays; sim.board.Impostor).
    attestation: bool = False
    impostor_rate: float = 0.0
    state_dir: Path | None = None
    ledger_url: str | None = None
    lot: str = DEMO_LOT
    # Feed more boards into an existing lot of the state directory instead of refusing to.
    resume: bool = False
    metrics: bool = False
    # Serve /metrics on this port (None: DEFAULT_METRICS_PORT when ``metrics``).
    metrics_port: int | None = None
    mqtt: bool = False
    log_level: str = "warning"
    # Serve the HTTP API and the station page on 127.0.0.1:<port> (None: not at all).
    api_port: int | None = None
    # Show a live view of the ports on the terminal (rich).
    live_view: bool = False
    # Told where the running demo is (page, tokens, files) once its station is ready.
    on_started: Callable[[DemoStarted], None] | None = None
    # Called after the last board while the API and /metrics still serve.
    on_finished: Callable[[Daemon], Awaitable[None]] | None = None
    # Labels (docs/labels.md): one simulated ZPL printer per port on 127.0.0.1 keeps every label
    # (always on for a Matter lot).
    labels: bool = False
    # A Matter lot on the profile's boards (test PAA/PAI/CD; docs/matter.md); --profile matter sets it.
    matter: bool = False

    @property
    def makes_matter(self) -> bool:
        """Whether the demo's lot is a Matter lot."""
        return self.matter or self.profile == "matter"


@dataclass(frozen=True)
class BoardOutcome:
    """How one simulated board ended: its place in the supply, serial, last job's outcome, faults."""

    position: int
    serial: str
    outcome: str
    reason: str | None
    faults_injected: int


@dataclass
class DemoResult:
    """What the demo measured and checked."""

    state_dir: Path
    # False: the state directory was a temporary one and is gone.
    state_dir_kept: bool
    config_path: Path
    lot: str
    jobs: JobCounts
    outcomes: dict[str, int]
    lot_provisioned: int
    audit_entries: int
    manifest_path: Path
    signature_path: Path
    manifest_count: int
    certificates_verified: int
    elapsed_s: float
    rate: Rate
    devices: int = 0
    duplicate_ids: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    faults_injected: int = 0
    # Injected faults on boards that still ended provisioned: the retries recovered them.
    faults_recovered: int = 0
    boards_failed: int = 0
    boards: list[BoardOutcome] = field(default_factory=list)
    # The signal that ended the demo (e.g. "SIGHUP"), None when it ended with its supply.
    stopped_by: str | None = None
    # Every board of the supply was fed in and finished (False: a signal stopped the run early).
    complete: bool = True
    # Labels the simulated printers received (with ``DemoOptions.labels``): one per provisioned board.
    labels_printed: int = 0
    # Labels the station could not make (their template cannot render them); the reason is in the log.
    labels_failed: int = 0

    @property
    def provisioned(self) -> int:
        """Devices this run provisioned (jobs that ended provisioned; factoryd.telemetry.figures)."""
        return self.jobs.provisioned

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form: one key per figure."""
        return {
            "lot": self.lot,
            "devices": self.devices,
            "provisioned": self.jobs.provisioned,
            "rechecked": self.jobs.rechecked,
            "failed": self.jobs.failed,
            "boards_failed": self.boards_failed,
            "faults_injected": self.faults_injected,
            "faults_recovered": self.faults_recovered,
            "outcomes": self.outcomes,
            "failures": self.failures,
            "lot_provisioned": self.lot_provisioned,
            "duplicate_ids": self.duplicate_ids,
            "certificates_verified": self.certificates_verified,
            "audit_entries": self.audit_entries,
            "manifest": str(self.manifest_path),
            "manifest_signature": str(self.signature_path),
            "manifest_count": self.manifest_count,
            "elapsed_s": round(self.elapsed_s, 3),
            "provisioned_per_hour": round(self.rate.per_hour, 1),
            "rate_window_s": round(self.rate.window_s, 3),
            "state_dir": str(self.state_dir),
            "state_dir_kept": self.state_dir_kept,
            "config": str(self.config_path),
            "stopped_by": self.stopped_by,
            "complete": self.complete,
            "labels_printed": self.labels_printed,
            "labels_failed": self.labels_failed,
        }


def demo_settings(options: DemoOptions, state_dir: Path) -> Settings:
    """Settings of the simulated station."""
    return load_settings(
        None,
        station={"name": STATION_NAME, "line": LINE_NAME, "state_dir": state_dir},
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
            "lot": options.lot,
            "rescan_s": 0.2,
            "reply_timeout_scale": 0.2 if options.timing == "zero" else 1.0,
            "backoff_initial_s": 0.01,
        },
        metrics={
            "enabled": options.metrics or options.metrics_port is not None,
            "port": options.metrics_port if options.metrics_port is not None else DEFAULT_METRICS_PORT,
        },
        # The demo serves the API and station page only when asked (port 8080 may be taken).
        api={"enabled": options.api_port is not None, "port": options.api_port or 0},
        mqtt={"enabled": options.mqtt},
        log={"level": options.log_level, "format": "console"},
    )


def demo_passphrase(state_dir: Path) -> tuple[bytes, Path | None]:
    """The CA passphrase: $FACTORYD_CA_PASSPHRASE, else the state dir's file (made on first use)."""
    from_env = os.environ.get(DEFAULT_PASSPHRASE_ENV)
    if from_env:
        return from_env.encode(), None
    path = state_dir / PASSPHRASE_FILE
    if path.is_file():
        value = path.read_bytes().rstrip(b"\r\n")
        if not value:
            raise ConfigError(f"{path} is empty: remove it, or set {DEFAULT_PASSPHRASE_ENV}")
        return value, path
    value = secrets.token_urlsafe(24).encode()
    write_private(path, value + b"\n")
    return value, path


def _toml_str(value: object) -> str:
    # A JSON string is a valid TOML basic string for the paths and URLs written here.
    return json.dumps(str(value))


def write_station_config(options: DemoOptions, settings: Settings, passphrase_file: Path | None) -> Path:
    """Write ``factoryd.toml`` into the state dir: the demo's station, for `-c` on every command."""
    state_dir = settings.station.state_dir
    path = state_dir / CONFIG_FILE
    passphrase_note = (
        f"# The lot's CA key is encrypted under the passphrase in {passphrase_file} (0600).\n"
        if passphrase_file is not None
        else f"# The lot's CA key is encrypted under the passphrase in ${DEFAULT_PASSPHRASE_ENV}.\n"
    )
    lines = [
        "# Written by `factoryd demo`: this state directory as a station, for `factoryd ... -c <this file>`.",
        passphrase_note.rstrip("\n"),
        "[station]",
        f"name = {_toml_str(STATION_NAME)}",
        f"line = {_toml_str(LINE_NAME)}",
        f"state_dir = {_toml_str(state_dir)}",
        "",
        "[ledger]",
        f"url = {_toml_str(settings.ledger_url)}",
        "",
        "[jobs]",
        f"lot = {_toml_str(options.lot)}",
        "",
        *(["[pki]", f"passphrase_file = {_toml_str(passphrase_file)}", ""] if passphrase_file else []),
        "[hub]",
        'backend = "sim"',
        "",
        "[hub.sim]",
        f"ports = {options.ports}",
        f"boards = {options.boards}",
        "",
    ]
    if options.api_port is not None:
        lines += ["[api]", f"port = {options.api_port}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclass(frozen=True)
class PreparedLot:
    """The lot a demo run feeds: the firmware key its boards' bootloaders trust, boards fed before."""

    fw_public: ec.EllipticCurvePublicKey
    boards_before: int = 0


def _demo_runs(state_dir: Path) -> dict[str, int]:
    """Boards fed into each lot by earlier demo runs in this state directory."""
    path = state_dir / DEMO_RUNS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}): remove it to start the count again") from None
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ConfigError(f"{path} is not a map of lot names to board counts: remove it")
    return {str(k): int(v) for k, v in data.items()}


def record_demo_run(state_dir: Path, lot: str, boards: int) -> None:
    """Add this run's boards to the lot's count (so a resumed run feeds new boards, not the same ones)."""
    runs = _demo_runs(state_dir)
    runs[lot] = runs.get(lot, 0) + boards
    (state_dir / DEMO_RUNS_FILE).write_text(json.dumps(runs, sort_keys=True) + "\n", encoding="utf-8")


def prepare_lot(options: DemoOptions, settings: Settings, passphrase: bytes) -> ec.EllipticCurvePublicKey:
    """Create the demo lot: PKI, bundle, firmware, ID list; return the firmware-signing public key."""
    return prepare_demo_lot(options, settings, passphrase).fw_public


def prepare_demo_lot(options: DemoOptions, settings: Settings, passphrase: bytes) -> PreparedLot:
    """Create the demo lot (PKI, bundle, firmware, ID list), or with ``resume`` continue an existing one."""
    paths = StationPaths(settings.station.state_dir)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with Ledger.open(settings.ledger_url) as ledger:
        try:
            existing: LotInfo | None = ledger.get_lot(options.lot)
        except LotNotFoundError:
            existing = None
    if existing is None:
        return PreparedLot(_create_lot(options, settings, passphrase))
    if not options.resume:
        raise ConfigError(
            f"a lot named {options.lot!r} already exists in {paths.state_dir}: add --resume to feed more "
            f"boards into it, or --lot <new name> for a new lot in this state directory, or use another "
            "--state-dir"
        )
    return _resume_lot(options, settings, passphrase, existing)


def _resume_lot(options: DemoOptions, settings: Settings, passphrase: bytes, info: LotInfo) -> PreparedLot:
    paths = StationPaths(settings.station.state_dir)
    if info.state is LotState.CLOSED:
        raise ConfigError(f"lot {info.name!r} is closed: it cannot be resumed; use --lot <new name>")
    if info.profile.protocol != demo_protocol(options.profile) or (info.profile.matter is None) == (
        options.makes_matter
    ):
        raise ConfigError(
            f"lot {info.name!r} is a {info.profile.protocol} lot: "
            f"resume it with --profile {info.profile.protocol}"
        )
    # Opening the bundle checks the passphrase before anything runs (a wrong one is refused here).
    BundleStore(paths.bundles, passphrase).load(info.name)
    firmware = FirmwareStore(paths.firmware).load_current(info.name, info.profile)
    if firmware is not None:
        key = serialization.load_pem_public_key(firmware.signing_key_pem)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(f"lot {info.name!r}: its firmware-signing key is not an EC public key")
        fw_public = key
    else:
        # The lot flashes no firmware: the boards' bootloader key is never used.
        fw_public = ec.generate_private_key(ec.SECP256R1()).public_key()
    with Ledger.open(settings.ledger_url) as ledger:
        available = ledger.progress(info.name).available
        wanted = max(1, int(options.boards * ID_MARGIN) + 1)
        if available < wanted:
            more = "\n".join(str(uuid.uuid4()) for _ in range(wanted - available))
            ledger.import_ids(info.name, more.encode(), filename="demo-ids-resume.txt", actor="demo")
        if info.state is not LotState.ACTIVE:
            ledger.set_lot_state(info.name, LotState.ACTIVE, actor="demo")
    return PreparedLot(fw_public, boards_before=_demo_runs(paths.state_dir).get(info.name, 0))


def _create_lot(options: DemoOptions, settings: Settings, passphrase: bytes) -> ec.EllipticCurvePublicKey:
    paths = StationPaths(settings.station.state_dir)
    lot_name = options.lot
    upload_passphrase = secrets.token_urlsafe(16).encode()
    protocol = demo_protocol(options.profile)
    pki = make_test_pki(profile_kind=board_profile(protocol).cert_kind, passphrase=upload_passphrase)
    matter_pki = make_matter_test_pki(passphrase=upload_passphrase) if options.makes_matter else None
    fw_key = ec.generate_private_key(ec.SECP256R1())
    # The customer's MCUboot image, signed here by the simulator's signer (the station never signs).
    payload = b"factoryd demo application firmware " + DEMO_FW_VERSION.encode() + bytes(range(256)) * 64
    image = sign_image(payload, fw_key, DEMO_FW_VERSION)
    # The Arduino sketch has no firmware-update or lock command (it locks its config zone itself).
    flash = options.flash and protocol in SECURE_ELEMENT_PROFILES
    profile = LotProfile(
        protocol=protocol,
        lock=options.lock and protocol in SECURE_ELEMENT_PROFILES,
        slot_size=DEFAULT_SLOT_BYTES,
        attestation="required" if options.attestation else "none",
        matter=(
            MatterProfile(
                vendor_id=TEST_VENDOR_ID, product_ids=(TEST_PRODUCT_ID,), iterations=PBKDF_MIN_ITERATIONS
            )
            if matter_pki is not None
            else None
        ),
    )
    ids = "\n".join(str(uuid.uuid4()) for _ in range(max(1, int(options.boards * ID_MARGIN) + 1)))
    with Ledger.open(settings.ledger_url) as ledger:
        lot = ledger.create_lot(
            lot_name, customer="demo-customer", profile=profile, target_quantity=options.boards, actor="demo"
        )
        bundle = parse_bundle(matter_pki.pkcs12 if matter_pki else pki.pkcs12, upload_passphrase, lot)
        store_bundle(paths, passphrase, lot_name, bundle)
        if matter_pki is not None:
            setup_matter_lot(
                ledger,
                paths,
                passphrase,
                lot_name,
                paa=matter_pki.paa_pem,
                cd=matter_pki.cd_der,
                cd_signer=matter_pki.cd_signer_pem,
                recipient=_demo_customer_recipient(paths.state_dir),
                actor="demo",
            )
        if flash:
            pem = fw_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            store_lot_firmware(ledger, FirmwareStore(paths.firmware), lot_name, image, pem, actor="demo")
        ledger.import_ids(lot_name, ids.encode(), filename="demo-ids.txt", actor="demo")
        if options.attestation:
            roots = SimVendorCa.make(seed=options.seed).root_pem
            store_attestation_roots(paths, ledger, lot_name, roots, actor="demo")
        ledger.set_lot_state(lot_name, LotState.ACTIVE, actor="demo")
    return fw_key.public_key()


def _demo_customer_recipient(state_dir: Path) -> bytes:
    """The demo customer's certificate (PEM) for the onboarding codes; its RSA key stays in the state dir."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "factoryd demo customer (onboarding codes)")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(state_dir / MATTER_CUSTOMER_KEY_FILE, key_pem)
    write_private(state_dir / MATTER_CUSTOMER_CERT_FILE, cert_pem, mode=0o644)
    return cert_pem


def make_access_tokens(settings: Settings) -> tuple[str, Path]:
    """An operator token for the station page and a supervisor token file for `factoryd status`."""
    state_dir = settings.station.state_dir
    run = secrets.token_hex(3)  # token names are never reused: one pair per demo run
    with Ledger.open(settings.ledger_url), TokenStore.open(settings.ledger_url) as store:
        _, operator = store.create(f"demo-operator-{run}", Role.OPERATOR)
        _, supervisor = store.create(f"demo-supervisor-{run}", Role.SUPERVISOR)
    write_private(state_dir / OPERATOR_TOKEN_FILE, operator.encode() + b"\n")
    supervisor_file = state_dir / SUPERVISOR_TOKEN_FILE
    write_private(supervisor_file, supervisor.encode() + b"\n")
    return operator, supervisor_file


def board_seed(seed: int, lot: str, position: int) -> int:
    """The seed of the board at ``position`` in the supply (1 = first): (seed, lot, position) alone."""
    digest = hashlib.sha256(f"factoryd-demo/{seed}/{lot}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class DemoSupply:
    """The simulated operator's supply of boards, each seeded by its position (1 = the first one fed in).

    The hub calls it once per board, in supply order; ``positions`` maps each board's station serial
    (``board_identity``) to its position.
    """

    def __init__(
        self, options: DemoOptions, fw_public: ec.EllipticCurvePublicKey, *, first_position: int = 1
    ) -> None:
        self._options = options
        self._fw_public = fw_public
        self._timing = (Timing.realistic() if options.timing == "realistic" else Timing()).scaled(
            options.timing_scale
        )
        self._next = first_position
        self.positions: dict[str, int] = {}
        self._vendor = SimVendorCa.make(seed=options.seed) if options.attestation else None
        self._foreign = SimVendorCa.make("factoryd Other SE Vendor", seed=options.seed)
        # The serial of the last genuine board: what the next clone copies.
        self._genuine_serial: bytes | None = None
        # The impostor kind of each board the supply made, by station serial (None: genuine).
        self.impostors: dict[str, Impostor] = {}

    def __call__(self) -> SimBoard:
        """The next board of the supply."""
        options, timing, position = self._options, self._timing, self._next
        self._next += 1
        seed = board_seed(options.seed, options.lot, position)
        faults = FaultPlan.uniform(options.fault_rate, seed=seed, per_power_on=True)
        se = SimSecureElement(serial=seeded_se_serial(seed))
        board: SimBoard
        if options.profile == "arduino-v1":
            # Arduino's sketch: its own board model, serial line at 57600 baud.
            arduino_timing = replace(timing, baudrate=ARDUINO_BAUDRATE) if timing.baudrate else timing
            usb_serial = hashlib.sha256(f"usb/{seed}".encode()).hexdigest()[: 2 * USB_SERIAL_BYTES].upper()
            board = SimArduinoBoard(se=se, faults=faults, timing=arduino_timing, usb_serial=usb_serial)
        elif options.profile == "mcumgr":
            # A Zephyr/MCUboot board over SMP: the same line timing plus flash, swap and watchdog.
            board = SimMcumgrBoard(
                se=se, faults=faults, timing=McumgrTiming.for_timing(timing), firmware_key=self._fw_public
            )
        elif options.profile == "nrf91-at":
            # An nRF91 modem on stock firmware: KEYGEN takes seconds; URCs now and then.
            modem_timing = nrf91_timing().scaled(options.timing_scale) if timing.baudrate else timing
            board = SimNrf91Modem(se=se, faults=faults, timing=modem_timing, urc_rate=0.05)
        else:
            board = SimBoard(se=se, faults=faults, timing=timing, firmware_key=self._fw_public)
            if self._vendor is not None:
                self._equip(board, self._vendor, seed)
        self.positions[board_identity(board)] = position
        return board

    def _equip(self, board: SimBoard, vendor: SimVendorCa, seed: int) -> None:
        # Reproducible per position, apart from the fault draws: not cryptography.
        rng = random.Random(seed ^ 0xA77E57)  # noqa: S311
        impostor = rng.choice(list(Impostor)) if rng.random() < self._options.impostor_rate else None
        equip_attestation(board, vendor, impostor, foreign=self._foreign, copied_serial=self._genuine_serial)
        if impostor is None:
            self._genuine_serial = board.se.serial
        else:
            self.impostors[board_identity(board)] = impostor


async def run_demo(options: DemoOptions) -> DemoResult:
    """Run the demo; returns what it measured and verified."""
    temporary = options.state_dir is None
    state_dir = options.state_dir or Path(tempfile.mkdtemp(prefix="factoryd-demo-"))
    try:
        return await _run_demo(options, state_dir, temporary)
    finally:
        if temporary:
            await asyncio.to_thread(shutil.rmtree, state_dir, True)


async def _run_demo(options: DemoOptions, state_dir: Path, temporary: bool) -> DemoResult:
    settings = demo_settings(options, state_dir)
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
    passphrase, passphrase_file = await asyncio.to_thread(demo_passphrase, state_dir)
    prepared = await asyncio.to_thread(prepare_demo_lot, options, settings, passphrase)
    config_path = write_station_config(options, settings, passphrase_file)
    tokens = await asyncio.to_thread(make_access_tokens, settings) if settings.api.enabled else None

    supply = DemoSupply(options, prepared.fw_public, first_position=prepared.boards_before + 1)
    hub = SimHub(options.ports, supply, supply=options.boards)
    # A Matter line prints its onboarding codes: the demo has a simulated printer per port.
    printers = await start_printers(hub.ports()) if options.labels or options.makes_matter else {}
    if printers:
        settings = settings.model_copy(update={"labels": printer_settings(printers)})

    def finished(station: Station) -> bool:
        # With printers: also wait until every provisioned board's label came out (or cannot).
        failed = station.labels.failed if station.labels is not None else 0
        return hub.exhausted and printed_labels(printers) + failed >= (
            station.outcomes["provisioned"] if printers else 0
        )

    started = time.monotonic()
    hooks = DaemonHooks(hub=hub, passphrase=passphrase, stop_when=finished, hangup_stops=True)
    daemon = Daemon(settings, hooks)

    async def operator(station: Station) -> None:
        if options.on_started is not None:
            files = _DemoFiles(config_path, temporary, passphrase_file, tokens)
            options.on_started(_started_info(settings, daemon, files))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(simulated_operator(station))
            if options.live_view:
                from factoryd.demo_view import show  # noqa: PLC0415 - terminal only

                tg.create_task(show(daemon.live, station, options.boards))
        if options.on_finished is not None:
            await options.on_finished(daemon)

    hooks.on_ready = operator
    try:
        station = await daemon.run()
    finally:
        await stop_printers(printers)
        await asyncio.to_thread(record_demo_run, state_dir, options.lot, hub.boards_inserted)
    ended = datetime.now(UTC)
    elapsed = time.monotonic() - started
    rate = daemon.live.rate(ended, station.started_at)
    result = await asyncio.to_thread(
        _verify,
        settings,
        passphrase,
        station,
        hub.finished,
        lot=options.lot,
        positions=supply.positions,
        clock=_RunClock(elapsed, rate, partial=not hub.exhausted),
        earlier_runs=prepared.boards_before > 0,
    )
    result.state_dir_kept = not temporary
    result.config_path = config_path
    result.stopped_by = daemon.stopped_by.name if daemon.stopped_by is not None else None
    result.complete = hub.exhausted
    result.labels_printed = printed_labels(printers)
    result.labels_failed = station.labels.failed if station.labels is not None else 0
    return result


@dataclass(frozen=True)
class _DemoFiles:
    config_path: Path
    temporary: bool
    passphrase_file: Path | None
    tokens: tuple[str, Path] | None


def _started_info(settings: Settings, daemon: Daemon, files: _DemoFiles) -> DemoStarted:
    tokens = files.tokens
    page_url = f"http://127.0.0.1:{daemon.api_port}/station" if daemon.api_port is not None else None
    metrics_url = (
        f"http://127.0.0.1:{daemon.metrics_port}/metrics" if daemon.metrics_port is not None else None
    )
    return DemoStarted(
        state_dir=settings.station.state_dir,
        config_path=files.config_path,
        temporary=files.temporary,
        passphrase_file=files.passphrase_file,
        page_url=page_url,
        operator_token=tokens[0] if tokens else None,
        supervisor_token_file=tokens[1] if tokens else None,
        metrics_url=metrics_url,
    )


def board_identity(board: SimBoard) -> str:
    """The serial the station keys a board's reservation on."""
    if isinstance(board, SimArduinoBoard):
        return f"usb:{board.usb_serial.lower()}"
    if isinstance(board, SimNrf91Modem):
        return board.serial_text
    return board.serial_hex


def stored_certificate(board: SimBoard) -> bytes | None:
    """The certificate a board holds (an Arduino board rebuilds it from its compressed slots)."""
    if isinstance(board, SimArduinoBoard):
        return board.rebuilt_certificate()
    if isinstance(board, SimNrf91Modem):
        return board.stored_certificate()
    return board.se.objects.get(ObjectId.DEVICE_CERT)


def stored_device_id(board: SimBoard) -> str | None:
    """The device ID a board holds."""
    if isinstance(board, SimArduinoBoard | SimNrf91Modem):
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


def check_certificate(record: ProvisionedDevice, issuing_ca: x509.Certificate) -> x509.Certificate:
    """Check a device's certificate: issued by the lot's CA, CN the device ID; raise VerificationError."""
    cert = x509.load_der_x509_certificate(record.cert_der)
    try:
        cert.verify_directly_issued_by(issuing_ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise VerificationError(
            f"{record.device_id}: certificate not issued by the lot's CA ({exc})"
        ) from None
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    if cn != record.device_id:
        raise VerificationError(f"{record.device_id}: certificate names {cn!r}")
    return cert


def check_provisioned(
    record: ProvisionedDevice, issuing_ca: x509.Certificate, boards: dict[str, SimBoard]
) -> None:
    """Check one provisioned device end to end; raise VerificationError naming what is wrong."""
    cert = check_certificate(record, issuing_ca)
    board = boards.get(record.hw_serial)
    if board is None:
        raise VerificationError(f"{record.device_id}: board {record.hw_serial} is not one of this run's")
    if stored_certificate(board) != record.cert_der:
        raise VerificationError(f"{record.device_id}: board {record.hw_serial} holds another certificate")
    key = cert.public_key()
    point = key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    # An nRF91 modem keeps the key in its credential store, not in a secure-element slot.
    held = (
        board.key_public_point(NRF_CLOUD_SEC_TAG)
        if isinstance(board, SimNrf91Modem)
        else board.se.public_point(0)
    )
    if not isinstance(key, ec.EllipticCurvePublicKey) or point != held:
        raise VerificationError(f"{record.device_id}: certificate key is not the secure element's key")


@dataclass(frozen=True)
class _RunClock:
    elapsed_s: float
    rate: Rate
    # Stopped early (a signal): boards still on the fixture are not in the hub's finished list.
    partial: bool = False


def _verify(
    settings: Settings,
    passphrase: bytes,
    station: Station,
    boards: list[SimBoard],
    *,
    lot: str,
    positions: dict[str, int],
    clock: _RunClock,
    earlier_runs: bool = False,
) -> DemoResult:
    paths = StationPaths(settings.station.state_dir)
    with Ledger.open(settings.ledger_url) as ledger:
        audit_entries = ledger.verify_audit()
        devices = ledger.provisioned_devices(lot)
        manifest = export_manifest(ledger, paths, passphrase, lot)
    json_path, sig_path = write_manifest(manifest, paths.manifests)
    issuing_ca = BundleStore(paths.bundles, passphrase).load(lot).certificate
    by_serial = {board_identity(b): b for b in boards}
    for record in devices:
        if record.hw_serial in by_serial:
            check_provisioned(record, issuing_ca, by_serial)
        elif clock.partial or earlier_runs:
            # Made by an earlier (resumed) run, or still on the fixture after an early stop: its board is
            # not here to read back, its certificate still has to be the lot CA's and name its ID.
            check_certificate(record, issuing_ca)
        else:
            raise VerificationError(f"{record.device_id}: board {record.hw_serial} is not one of this run's")
    on_boards = Counter(device_id for b in boards if (device_id := stored_device_id(b)))
    failures: dict[str, int] = {}
    last_result = {}
    for result in station.results:
        last_result[result.hw_serial] = result
        if result.outcome in ("failed", "refused"):
            key = result.reason or "unknown"
            failures[key] = failures.get(key, 0) + 1
    outcomes: list[BoardOutcome] = []
    for board in sorted(boards, key=lambda b: positions.get(board_identity(b), 0)):
        serial = board_identity(board)
        final = last_result.get(serial)
        outcomes.append(
            BoardOutcome(
                position=positions.get(serial, 0),
                serial=serial,
                outcome=final.outcome if final is not None else "not run",
                reason=final.reason if final is not None else None,
                faults_injected=sum(board.injected.values()),
            )
        )
    return DemoResult(
        state_dir=settings.station.state_dir,
        state_dir_kept=True,
        config_path=settings.station.state_dir / CONFIG_FILE,
        lot=lot,
        jobs=JobCounts.from_outcomes(station.outcomes),
        outcomes=dict(station.outcomes),
        lot_provisioned=len(devices),
        audit_entries=audit_entries,
        manifest_path=json_path,
        signature_path=sig_path,
        manifest_count=manifest.count,
        certificates_verified=len(devices),
        elapsed_s=clock.elapsed_s,
        rate=clock.rate,
        devices=len(boards),
        duplicate_ids=sum(1 for n in on_boards.values() if n > 1),
        failures=failures,
        faults_injected=sum(o.faults_injected for o in outcomes),
        faults_recovered=sum(o.faults_injected for o in outcomes if o.outcome not in FAILED_OUTCOMES),
        boards_failed=sum(1 for o in outcomes if o.outcome in FAILED_OUTCOMES),
        boards=outcomes,
    )
