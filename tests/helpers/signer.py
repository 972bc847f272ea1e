"""A line with the signing service: the signer as a real process, stations that sign through it.

``make_signer_line`` prepares a lot (the demo's set-up: PKI, bundle, firmware, IDs) in the *signer's*
state directory on the given ledger, creates the line CA, the signer's TLS certificate and one client
certificate per station; ``SignerProcess`` runs ``factoryd signer run`` on it; ``station_settings``
gives a station that holds no CA key and signs through the signer.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.config import Settings, load_settings
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.demo import DEMO_LOT, DemoOptions, demo_settings
from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.pki.attestation import AttestationRootStore, load_attestation_roots
from factoryd.pki.bundle import CaBundle
from factoryd.pki.testca import TestPki, make_test_pki
from factoryd.service import (
    StationPaths,
    parse_bundle,
    prepare_state_dir,
    store_attestation_roots,
    store_bundle,
)
from factoryd.signer.lineca import init_line_ca, issue_signer_cert, issue_station_cert
from factoryd.sim.board import FaultPlan, SimBoard
from factoryd.sim.bootloader import DEFAULT_SLOT_BYTES
from factoryd.sim.hub import SimHub
from factoryd.sim.secure_element import SimVendorCa
from factoryd.telemetry.events import TelemetrySink

LOT = DEMO_LOT
LOOPBACK = "127.0.0.1"
PASSPHRASE_ENV = "FACTORYD_CA_PASSPHRASE"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class SignerLine:
    """A lot held by a signer, and what stations need to use it."""

    root: Path
    ledger_url: str
    passphrase: bytes
    fw_public: ec.EllipticCurvePublicKey
    signer_state: Path
    line_ca_cert: Path
    signer_cert: Path
    signer_key: Path
    port: int
    pki: TestPki | None = None
    vendor: SimVendorCa | None = None
    stations: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The signer's URL."""
        return f"https://{LOOPBACK}:{self.port}"

    def station_cert(self, name: str) -> tuple[Path, Path]:
        """A (cached) client certificate and key for station ``name``."""
        if name not in self.stations:
            from factoryd.signer.lineca import load_line_ca

            ca = load_line_ca(self.line_ca_cert.parent, self.passphrase)
            self.stations[name] = issue_station_cert(ca, name, self.root / "station-certs")
        return self.stations[name]

    def board(self, faults: FaultPlan | None = None) -> SimBoard:
        """A fresh board (a genuine part of the lot's SE vendor when the lot requires attestation)."""
        board = SimBoard(firmware_key=self.fw_public, faults=faults or FaultPlan())
        if self.vendor is not None:
            self.vendor.provision(board.se)
        return board

    def config(self, *, metrics_port: int = 0, mqtt_port: int = 0, extra: str = "") -> Path:
        """The signer's config file."""
        path = self.root / "signer.toml"
        path.write_text(
            f"""
[station]
name = "signer-1"
line = "test-line"
state_dir = "{self.signer_state}"

[ledger]
url = "{self.ledger_url}"

[signer]
host = "{LOOPBACK}"
port = {self.port}
tls_cert = "{self.signer_cert}"
tls_key = "{self.signer_key}"
{extra}

[metrics]
enabled = {"true" if metrics_port else "false"}
host = "{LOOPBACK}"
port = {metrics_port}

[api]
enabled = false

[mqtt]
enabled = {"true" if mqtt_port else "false"}
host = "{LOOPBACK}"
port = {mqtt_port or 1883}

[log]
level = "info"
"""
        )
        return path

    def client(self, station: str | None) -> httpx.Client:
        """An HTTPS client to the signer presenting ``station``'s certificate (None: none)."""
        context = ssl.create_default_context(cafile=str(self.line_ca_cert))
        if station is not None:
            cert, key = self.station_cert(station)
            context.load_cert_chain(str(cert), str(key))
        return httpx.Client(base_url=self.url, verify=context, timeout=10.0)

    def station_settings(self, name: str, state_dir: Path, *, ports: int, hold_s: float = 30.0) -> Settings:
        """A station on this line that signs through the signer (no CA key of its own)."""
        cert, key = self.station_cert(name)
        if self.vendor is not None:
            # The station checks genuineness before a reservation, as without a signer.
            AttestationRootStore(StationPaths(state_dir).attestation).save(
                LOT, load_attestation_roots(self.vendor.root_pem)
            )
        base = demo_settings(DemoOptions(ports=ports), state_dir).model_dump(mode="python")
        base["station"] = {"name": name, "line": "test-line", "state_dir": state_dir}
        base["ledger"] = {"url": self.ledger_url}
        base["hub"]["max_powered"] = ports
        base["hub"]["sim"]["ports"] = ports
        base["metrics"] = {"enabled": False}
        base["api"] = {"enabled": False}
        base["jobs"]["lot"] = LOT
        base["jobs"]["attention_after_failures"] = 1000
        base["pki"] = {
            "signer": self.url,
            "signer_cert_file": cert,
            "signer_key_file": key,
            "signer_ca_file": self.line_ca_cert,
            "signer_timeout_s": 5.0,
            "signer_hold_s": hold_s,
        }
        return load_settings(None, **base)


def make_signer_line(
    root: Path,
    ledger_url: str,
    *,
    ids: int = 40,
    to_token: Callable[[CaBundle, Path], None] | None = None,
    vendor: SimVendorCa | None = None,
) -> SignerLine:
    """An active lot with ``ids`` IDs on ``ledger_url``, its CA in the signer's state directory only.

    ``to_token(bundle, lot_dir)`` moves the CA key into a PKCS#11 token (the SoftHSM test); with
    ``vendor`` the lot requires key attestation to that SE vendor's root (on the signer and stations).
    The line CA, the signer's TLS certificate and the customer PKI (root key kept, for quotas) are made.
    """
    signer_state = root / "signer-state"
    paths = StationPaths(signer_state)
    prepare_state_dir(paths)
    passphrase = secrets.token_urlsafe(16).encode()
    upload_passphrase = secrets.token_urlsafe(16).encode()
    pki = make_test_pki(passphrase=upload_passphrase)
    profile = LotProfile(
        protocol="factoryd-v1",
        lock=True,
        slot_size=DEFAULT_SLOT_BYTES,
        attestation="none" if vendor is None else "required",
    )
    with Ledger.open(ledger_url) as ledger:
        ledger.create_lot(LOT, customer="ACME", profile=profile, target_quantity=ids, actor="test")
        bundle = parse_bundle(pki.pkcs12, upload_passphrase, ledger.get_lot(LOT))
        lot_dir = store_bundle(paths, passphrase, LOT, bundle)
        if to_token is not None:
            to_token(bundle, lot_dir)
        ledger.import_ids(LOT, "\n".join(str(uuid.uuid4()) for _ in range(ids)).encode(), actor="test")
        if vendor is not None:
            store_attestation_roots(paths, ledger, LOT, vendor.root_pem, actor="test")
        ledger.set_lot_state(LOT, LotState.ACTIVE, actor="test")
    ca = init_line_ca(signer_state / "signer" / "line-ca", passphrase, name="test line CA")
    cert, key = issue_signer_cert(ca, [LOOPBACK, "localhost"], signer_state / "signer" / "tls")
    return SignerLine(
        root=root,
        ledger_url=ledger_url,
        passphrase=passphrase,
        fw_public=ec.generate_private_key(ec.SECP256R1()).public_key(),  # the lot flashes no firmware
        signer_state=signer_state,
        line_ca_cert=ca.cert_path,
        signer_cert=cert,
        signer_key=key,
        port=free_port(),
        pki=pki,
        vendor=vendor,
    )


class SignerProcess:
    """``python -m factoryd signer run`` on a line's config, started and stopped by the test."""

    def __init__(
        self, line: SignerLine, *, env: dict[str, str] | None = None, config: Path | None = None
    ) -> None:
        self.line = line
        self.config = config or line.config()
        self.log = line.root / "signer.log"
        self.env = {**os.environ, PASSPHRASE_ENV: line.passphrase.decode(), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process and wait until it answers its health check."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "factoryd", "signer", "run", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        with self.line.client("health-probe") as client:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"the signer exited ({self.proc.returncode}):\n{self.log.read_text()}"
                    )
                try:
                    if client.get("/healthz").status_code == httpx.codes.OK:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"the signer did not start:\n{self.log.read_text()}")
                time.sleep(0.05)

    def reload(self) -> None:
        """SIGHUP: the signer re-reads the line CA's CRL and reopens its lots."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush (a power cut of the signer host)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(STOP_TIMEOUT_S)


async def run_station(
    settings: Settings,
    hub: SimHub,
    passphrase: bytes,
    *,
    stop_when: Callable[[Station], bool] | None = None,
    timeout_s: float = 60.0,
    on_ready: Callable[[Station], Any] | None = None,
    sinks: tuple[TelemetrySink, ...] = (),
) -> Station:
    """Run one station daemon until its hub is used up (or ``stop_when``)."""

    def done(station: Station) -> bool:
        return stop_when(station) if stop_when else hub.exhausted

    hooks = DaemonHooks(hub=hub, passphrase=passphrase, stop_when=done, on_ready=on_ready, extra_sinks=sinks)
    async with asyncio.timeout(timeout_s):
        return await Daemon(settings, hooks).run()
