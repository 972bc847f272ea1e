"""`factoryd bench signer`: certificates per second through the line's signer, and what it adds per board.

The signer runs as its own process (``factoryd signer run``, mutual TLS on loopback) on a ledger of
the caller's choice (a PostgreSQL URL for the shared-ledger figure; a temporary SQLite file by
default). This process plays ``stations`` stations at once: each has its own client certificate,
reserves IDs in the ledger as a station does, and sends one request per board. CSRs are made before
the clock starts (that is the board's work, not the signer's).

Two figures:

- **throughput**: signed certificates per second with every station sending back to back;
- **added latency per board**: the issue step through the signer (one request, one board at a time,
  and with all stations busy) against the same step done locally as today (CSR checks, signing with the
  lot's key in this process, the ``cert.issued`` audit entry committed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import platform
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.errors import ConfigError
from factoryd.jobs.lots import cert_profile
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.pki.issuer import Issuer
from factoryd.pki.testca import make_test_pki
from factoryd.service import StationPaths, parse_bundle, prepare_state_dir, store_bundle
from factoryd.signer.lineca import init_line_ca, issue_signer_cert, issue_station_cert
from factoryd.signer.wire import HEALTH_PATH, ISSUE_PATH

LOT = "bench-signer"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 60.0
# Boards measured one at a time for the latency figures (local and through the signer), by default.
LATENCY_SAMPLES = 60


@dataclass(frozen=True)
class _Board:
    """One board's request, ready before the clock starts."""

    device_id: str
    serial: str
    job_id: int
    csr_der: bytes
    point: bytes

    def body(self) -> dict[str, object]:
        return {
            "request_id": uuid.uuid4().hex,
            "lot": LOT,
            "device_id": self.device_id,
            "hw_serial": self.serial,
            "job_id": self.job_id,
            "csr": base64.b64encode(self.csr_der).decode(),
            "key": base64.b64encode(self.point).decode(),
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _board(ledger: Ledger, station: str) -> _Board:
    serial = secrets.token_hex(9)
    job = ledger.start_job(LOT, station=station, port="1", hw_serial=serial)
    device_id = ledger.reserve(LOT, serial, station=station, port="1", job_id=job, actor=station).device_id
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return _Board(device_id, serial, job, csr.public_bytes(serialization.Encoding.DER), point)


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "mean": round(statistics.fmean(ordered), 3),
    }


@contextlib.contextmanager
def _signer_process(root: Path, config: Path, passphrase: bytes) -> Iterator[subprocess.Popen[bytes]]:
    log = (root / "signer.log").open("ab")
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "factoryd", "signer", "run", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FACTORYD_CA_PASSPHRASE": passphrase.decode()},
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.close()


class _Line:
    """The bench's lot, line CA, signer config and station certificates in a temporary directory."""

    def __init__(self, root: Path, ledger_url: str, stations: int, boards: int) -> None:
        self.root = root
        self.ledger_url = ledger_url
        self.passphrase = secrets.token_urlsafe(16).encode()
        state = root / "signer-state"
        paths = StationPaths(state)
        prepare_state_dir(paths)
        upload = secrets.token_urlsafe(16).encode()
        pki = make_test_pki(passphrase=upload)
        profile = LotProfile(protocol="factoryd-v1")
        with Ledger.open(ledger_url) as ledger:
            ledger.create_lot(LOT, customer="bench", profile=profile, target_quantity=boards, actor="bench")
            bundle = parse_bundle(pki.pkcs12, upload, ledger.get_lot(LOT))
            store_bundle(paths, self.passphrase, LOT, bundle)
            ids = "\n".join(str(uuid.uuid4()) for _ in range(boards))
            ledger.import_ids(LOT, ids.encode(), actor="bench")
            ledger.set_lot_state(LOT, LotState.ACTIVE, actor="bench")
        self.issuer = Issuer(bundle.signer(), bundle.chain, cert_profile(profile))
        ca = init_line_ca(state / "signer" / "line-ca", self.passphrase, name="bench line CA")
        self.ca_file = ca.cert_path
        cert, key = issue_signer_cert(ca, [LOOPBACK], state / "signer" / "tls")
        self.stations = [f"bench-{i + 1}" for i in range(stations)]
        self.certs = {name: issue_station_cert(ca, name, root / "stations") for name in self.stations}
        self.port = _free_port()
        self.config = root / "signer.toml"
        self.config.write_text(
            f'[station]\nname = "bench-signer"\nstate_dir = "{state}"\n'
            f'[ledger]\nurl = "{ledger_url}"\n'
            f'[signer]\nhost = "{LOOPBACK}"\nport = {self.port}\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
            "[metrics]\nenabled = false\n[api]\nenabled = false\n"
            '[log]\nlevel = "warning"\n'
        )

    def client(self, station: str) -> httpx.AsyncClient:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        cert, key = self.certs[station]
        context.load_cert_chain(str(cert), str(key))
        return httpx.AsyncClient(base_url=f"https://{LOOPBACK}:{self.port}", verify=context, timeout=30.0)


async def _wait_ready(line: _Line, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with line.client(line.stations[0]) as client:
        while True:
            if proc.poll() is not None:
                raise ConfigError(f"the signer exited: {(line.root / 'signer.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(HEALTH_PATH)).status_code == httpx.codes.OK:
                    return
            if time.monotonic() > deadline:
                raise ConfigError("the signer did not start in time")
            await asyncio.sleep(0.05)


async def _send(client: httpx.AsyncClient, board: _Board) -> float:
    started = time.perf_counter()
    response = await client.post(ISSUE_PATH, json=board.body())
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != httpx.codes.OK:
        raise ConfigError(f"the signer refused a bench request: {response.text}")
    return elapsed_ms


def _local_issue_ms(line: _Line, ledger: Ledger, board: _Board) -> float:
    """The issue step as a station does it without the signer: CSR checks, signing, audit commit."""
    started = time.perf_counter()
    csr = line.issuer.verify_csr(board.csr_der, board.device_id)
    issued = line.issuer.issue(csr, board.device_id)
    ledger.audit(
        actor="bench-local",
        action="cert.issued",
        subject=board.device_id,
        details={
            "hw_serial": board.serial,
            "cert_serial": issued.serial_hex,
            "fingerprint_sha256": hashlib.sha256(issued.der).hexdigest(),
            "job_id": board.job_id,
        },
    )
    return (time.perf_counter() - started) * 1000


async def _run(line: _Line, per_station: int, samples: int) -> dict[str, Any]:
    with Ledger.open(line.ledger_url) as ledger:
        load = {name: [_board(ledger, name) for _ in range(per_station)] for name in line.stations}
        single = [_board(ledger, line.stations[0]) for _ in range(samples)]
        local = [_board(ledger, "bench-local") for _ in range(samples)]
        local_ms = [_local_issue_ms(line, ledger, board) for board in local]
    with _signer_process(line.root, line.config, line.passphrase) as proc:
        await _wait_ready(line, proc)
        clients = {name: line.client(name) for name in line.stations}
        try:
            for client in clients.values():  # TLS sessions up before the clock: a station keeps its own
                await client.get(HEALTH_PATH)
            # One board at a time: the latency a board sees on an idle line (warm connection).
            remote_ms = [await _send(clients[line.stations[0]], board) for board in single]
            per_request: list[float] = []

            async def station(name: str) -> None:
                for board in load[name]:
                    per_request.append(await _send(clients[name], board))

            started = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                for name in line.stations:
                    tg.create_task(station(name))
            elapsed_s = time.perf_counter() - started
        finally:
            for client in clients.values():
                await client.aclose()
    total = len(line.stations) * per_station
    remote, loaded, local_p = _percentiles(remote_ms), _percentiles(per_request), _percentiles(local_ms)
    return {
        "requests": total,
        "seconds": round(elapsed_s, 3),
        "certificates_per_second": round(total / elapsed_s, 1),
        "issue_step_ms": {
            "local_signing": local_p,
            "through_signer_idle": remote,
            "through_signer_loaded": loaded,
        },
        "added_latency_per_board_ms": {
            "idle_p50": round(remote["p50"] - local_p["p50"], 3),
            "idle_p95": round(remote["p95"] - local_p["p95"], 3),
            "loaded_p50": round(loaded["p50"] - local_p["p50"], 3),
            "loaded_p95": round(loaded["p95"] - local_p["p95"], 3),
        },
    }


async def run_signer_bench(
    *,
    stations: int = 8,
    per_station: int = 50,
    ledger_url: str | None = None,
    latency_samples: int = LATENCY_SAMPLES,
) -> dict[str, Any]:
    """Run the signer benchmark; the ledger is a temporary SQLite file unless ``ledger_url`` is given."""
    if stations < 1 or per_station < 1 or latency_samples < 1:
        raise ValueError("stations, per_station and latency_samples must be at least 1")
    with tempfile.TemporaryDirectory(prefix="factoryd-bench-signer-") as tmp:
        root = Path(tmp)
        url = ledger_url or f"sqlite:///{root / 'ledger.db'}"
        boards = stations * per_station + 2 * latency_samples
        line = await asyncio.to_thread(_Line, root, url, stations, boards)
        figures = await _run(line, per_station, latency_samples)
        backend = url.split(":", 1)[0].split("+", 1)[0]
    return {
        "benchmark": "signer",
        "stations": stations,
        "per_station": per_station,
        "latency_samples": latency_samples,
        "ledger": backend,
        "signer_ca_key": "software (P-256)",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        **figures,
    }
