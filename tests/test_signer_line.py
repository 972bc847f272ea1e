"""The line's signer as a real process: two stations on one PostgreSQL ledger sign only through it.

Boards are simulated behind real PTYs (the production serial path), the signer is ``python -m factoryd
signer run`` with mutual TLS on loopback, the ledger a throwaway PostgreSQL database. Refused requests
are made with a real HTTPS client and a station's real client certificate. Sizes come from the
environment for a longer run by hand (``SIGNER_BOARDS``, ``SIGNER_KILL_BOARDS``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlmodel import Session, select

from factoryd.demo import stored_certificate, stored_device_id
from factoryd.ledger import Ledger
from factoryd.ledger.issuance import open_issuance_ledger
from factoryd.ledger.tables import AuditEntryRow
from factoryd.ledger.testing import throwaway_postgres_database
from factoryd.signer.lineca import init_line_ca, issue_station_cert, load_line_ca, revoke_station_cert
from factoryd.sim.board import SimBoard
from factoryd.sim.hub import SimHub
from factoryd.sim.secure_element import SimVendorCa
from factoryd.telemetry.events import JobEvent, LinkStats, LotProgressUpdate, PortUpdate
from tests.helpers.mqtt_broker import MosquittoBroker, MqttRecorder
from tests.helpers.signer import LOT, SignerLine, SignerProcess, make_signer_line, run_station

pytestmark = pytest.mark.postgres

BOARDS_PER_STATION = int(os.environ.get("SIGNER_BOARDS", "6"))
KILL_BOARDS = int(os.environ.get("SIGNER_KILL_BOARDS", "16"))
PORTS = 3


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database per test (each test makes its own lot)."""
    with throwaway_postgres_database() as url:
        yield url


@pytest.fixture
def line(tmp_path: Path, pg_url: str) -> SignerLine:
    """A lot whose CA only the signer holds."""
    return make_signer_line(tmp_path, pg_url, ids=4 * BOARDS_PER_STATION + KILL_BOARDS + 10)


@pytest.fixture
def signer(line: SignerLine) -> Iterator[SignerProcess]:
    """The signer process, running."""
    process = SignerProcess(line)
    process.start()
    try:
        yield process
    finally:
        process.stop()


class Recorder:
    """A telemetry sink that keeps the port updates (what the operator and supervisor see)."""

    def __init__(self) -> None:
        self.ports: list[PortUpdate] = []
        self.events: list[JobEvent] = []

    def port_update(self, update: PortUpdate) -> None:
        """Keep it."""
        self.ports.append(update)

    def job_event(self, event: JobEvent) -> None:
        """Keep it."""
        self.events.append(event)

    def lot_progress(self, update: LotProgressUpdate) -> None:
        """Not needed."""

    def link_stats(self, stats: LinkStats) -> None:
        """Not needed."""


def _audit(url: str, action: str) -> list[AuditEntryRow]:
    with Ledger.open(url) as ledger, Session(ledger._engine) as session:
        return list(session.exec(select(AuditEntryRow).where(AuditEntryRow.action == action)).all())


def _refusal_codes(url: str) -> Counter[str]:
    return Counter(json.loads(row.details)["code"] for row in _audit(url, "signer.refused"))


class Supply:
    """The boards one hub is fed, kept for the check of what ended up on them."""

    def __init__(self, line: SignerLine, count: int) -> None:
        self.boards: list[SimBoard] = []
        self.hub = SimHub(PORTS, self._make(line), supply=count)

    def _make(self, line: SignerLine) -> Callable[[], SimBoard]:
        def make() -> SimBoard:
            board = line.board()
            self.boards.append(board)
            return board

        return make


def _check_line(url: str, supplies: list[Supply], *, expect_provisioned: int) -> None:
    """Every board holds the one certificate the signer recorded as standing for its ID; nothing twice."""
    ledger = open_issuance_ledger(url)
    try:
        ledger.verify_audit()
        records = ledger.issuances(LOT)
        provisioned = {d.device_id: d for d in ledger.provisioned_devices(LOT)}
        progress = ledger.progress(LOT)
    finally:
        ledger.close()
    assert len(provisioned) == expect_provisioned
    standing = [r for r in records if r.current]
    # One standing certificate per ID, and no request answered with two certificates.
    assert len({r.device_id for r in standing}) == len(standing)
    assert len({r.request_id for r in records}) == len(records)
    assert len({r.cert_serial for r in records}) == len(records)
    by_fingerprint = {r.fingerprint_sha256: r for r in standing}
    for device_id, record in provisioned.items():
        signed = by_fingerprint.get(record.fingerprint_sha256)
        assert signed is not None, f"{device_id}: the ledger records a certificate the signer did not sign"
        assert signed.device_id == device_id
        assert signed.hw_serial == record.hw_serial
        assert signed.station == record.station
    # What is on the boards: each ID on one board, with the certificate the ledger records.
    on_boards = [board for supply in supplies for board in supply.boards]
    ids = Counter(stored_device_id(b) for b in on_boards if stored_device_id(b))
    assert all(n == 1 for n in ids.values()), ids.most_common(3)
    assert sum(ids.values()) == expect_provisioned
    for board in on_boards:
        device_id = stored_device_id(board)
        if device_id is None:
            continue
        cert = stored_certificate(board)
        assert cert is not None
        assert hashlib.sha256(cert).hexdigest() == provisioned[device_id].fingerprint_sha256
    # Superseded certificates were never recorded on a board.
    for record in records:
        if not record.current:
            assert record.fingerprint_sha256 not in {d.fingerprint_sha256 for d in provisioned.values()}
    assert progress.total == progress.available + progress.reserved + progress.provisioned + progress.void


def _station_key_files(state_dir: Path) -> list[Path]:
    return [p for p in state_dir.rglob("*") if p.is_file() and p.name in ("ca-key.pem", "pkcs11.json")]


async def test_two_stations_provision_through_the_signer(
    line: SignerLine, signer: SignerProcess, pg_url: str
) -> None:
    supplies = [Supply(line, BOARDS_PER_STATION) for _ in range(2)]
    stations = await asyncio.gather(
        *(
            run_station(
                line.station_settings(name, line.root / name, ports=PORTS),
                supply.hub,
                line.passphrase,
                timeout_s=60,
            )
            for name, supply in zip(("st-a", "st-b"), supplies, strict=True)
        )
    )
    for station in stations:
        assert station.outcomes["provisioned"] == BOARDS_PER_STATION, station.outcomes
    _check_line(pg_url, supplies, expect_provisioned=2 * BOARDS_PER_STATION)
    ledger = open_issuance_ledger(pg_url)
    try:
        stations_of = Counter(r.station for r in ledger.issuances(LOT))
    finally:
        ledger.close()
    assert stations_of == {"st-a": BOARDS_PER_STATION, "st-b": BOARDS_PER_STATION}
    # The stations never held the lot's CA key: only the signer's state has it.
    for name in ("st-a", "st-b"):
        assert _station_key_files(line.root / name) == []
    assert _station_key_files(line.signer_state) != []


def _csr(common_name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return csr.public_bytes(serialization.Encoding.DER), point


def _body(device_id: str, serial: str, job: int | None, *, cn: str | None = None) -> dict[str, object]:
    csr, point = _csr(cn or device_id)
    return {
        "request_id": secrets.token_hex(16),
        "lot": LOT,
        "device_id": device_id,
        "hw_serial": serial,
        "job_id": job,
        "csr": base64.b64encode(csr).decode(),
        "key": base64.b64encode(point).decode(),
    }


def _reserve(url: str, station: str) -> tuple[str, str, int]:
    with Ledger.open(url) as ledger:
        serial = secrets.token_hex(9)
        job = ledger.start_job(LOT, station=station, port="9", hw_serial=serial)
        return (
            ledger.reserve(LOT, serial, station=station, port="9", job_id=job, actor=station).device_id,
            serial,
            job,
        )


def _available_id(url: str) -> str:
    with Ledger.open(url) as ledger:
        serial = secrets.token_hex(9)
        device_id = ledger.reserve(LOT, serial, station="x", port="x", job_id=None, actor="x").device_id
        ledger.void(LOT, device_id, "test: to find an ID, then give it back as void", actor="test")
    # A voided ID is not reserved either: the refusal is the same.
    return device_id


def test_requests_outside_the_rules_are_refused_and_audited(
    line: SignerLine, signer: SignerProcess, pg_url: str, tmp_path: Path
) -> None:
    own_id, own_serial, own_job = _reserve(pg_url, "st-a")
    other_id, other_serial, other_job = _reserve(pg_url, "st-b")
    with line.client("st-a") as client:
        answers = {
            "not_reserved": client.post(
                "/v1/certificates", json=_body(_available_id(pg_url), own_serial, own_job)
            ),
            "wrong_station": client.post("/v1/certificates", json=_body(other_id, other_serial, other_job)),
            "csr_rejected": client.post(
                "/v1/certificates", json=_body(own_id, own_serial, own_job, cn="someone-else")
            ),
        }
        request = _body(own_id, own_serial, own_job)
        ok = client.post("/v1/certificates", json=request)
        assert ok.status_code == 200, ok.text
        assert ok.json()["replayed"] is False
        # The reply was lost and the station asks again: the same certificate, not a second one.
        again = client.post("/v1/certificates", json=request)
        assert again.status_code == 200, again.text
        assert again.json()["replayed"] is True
        assert again.json()["certificate"] == ok.json()["certificate"]
        # The board got its certificate and the job was recorded: a second one is never signed.
        cert = base64.b64decode(ok.json()["certificate"])
        with Ledger.open(pg_url) as ledger:
            ledger.mark_provisioned(
                LOT,
                own_id,
                own_serial,
                cert_der=cert,
                cert_serial=ok.json()["cert_serial"],
                fingerprint_sha256=hashlib.sha256(cert).hexdigest(),
                station="st-a",
                port="9",
                actor="st-a",
                finish_job=own_job,
            )
        answers["already_provisioned"] = client.post(
            "/v1/certificates", json=_body(own_id, own_serial, own_job)
        )
    for code, answer in answers.items():
        assert answer.status_code == 403, (code, answer.text)
        assert answer.json()["code"] == code, answer.text
    # The signer's own copy of the customer's certificate rules: the device certificate chains to the lot CA.
    assert line.pki is not None
    x509.load_der_x509_certificate(cert).verify_directly_issued_by(line.pki.issuing_cert)

    # Without a client certificate, and with one from another CA: no TLS session at all.
    with line.client(None) as anonymous, pytest.raises(httpx.HTTPError):
        anonymous.get("/healthz")
    stranger_ca = init_line_ca(tmp_path / "stranger-ca", b"stranger", name="test line CA")
    cert_path, key_path = issue_station_cert(stranger_ca, "st-a", tmp_path / "stranger")
    context = ssl.create_default_context(cafile=str(line.line_ca_cert))
    context.load_cert_chain(str(cert_path), str(key_path))
    with httpx.Client(base_url=line.url, verify=context) as forged, pytest.raises(httpx.HTTPError):
        forged.post("/v1/certificates", json=_body(other_id, other_serial, other_job))
    # The line CA's own server certificate is no station certificate either.
    context = ssl.create_default_context(cafile=str(line.line_ca_cert))
    context.load_cert_chain(str(line.signer_cert), str(line.signer_key))
    with httpx.Client(base_url=line.url, verify=context) as posing:
        try:
            posing_answer: httpx.Response | None = posing.post(
                "/v1/certificates", json=_body(other_id, other_serial, other_job)
            )
        except httpx.HTTPError:
            posing_answer = None  # refused in the handshake (no clientAuth usage)
    assert posing_answer is None or posing_answer.json()["code"] == "bad_client_certificate"

    async def audited() -> Counter[str]:
        for _ in range(100):
            codes = _refusal_codes(pg_url)
            if codes["tls_handshake_refused"] + codes["bad_client_certificate"] >= 3:
                return codes
            await asyncio.sleep(0.05)
        return _refusal_codes(pg_url)

    codes = asyncio.run(audited())
    for code in ("not_reserved", "wrong_station", "csr_rejected", "already_provisioned"):
        assert codes[code] == 1, codes
    assert codes["tls_handshake_refused"] + codes["bad_client_certificate"] >= 3, codes
    # Nothing was signed for the refused requests: the one good request is the only issuance.
    ledger = open_issuance_ledger(pg_url)
    try:
        assert [r.device_id for r in ledger.issuances(LOT)] == [own_id]
    finally:
        ledger.close()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "factoryd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


async def test_the_customer_quota_stops_issuance_at_n(line: SignerLine, pg_url: str, tmp_path: Path) -> None:
    quota = 4
    assert line.pki is not None
    key = tmp_path / "customer-root-key.pem"
    key.write_bytes(
        line.pki.root_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    root = tmp_path / "customer-root.pem"
    root.write_bytes(line.pki.root_pem)
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    made = _cli(
        "signer", "make-quota", "--lot", LOT, "--max", str(quota), "--expires", expires,
        "--key", str(key), "--cert", str(root), "--out", str(tmp_path / "quota.jws"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    env = {"FACTORYD_CA_PASSPHRASE": line.passphrase.decode()}
    installed = _cli(
        "signer", "quota-install", LOT, str(tmp_path / "quota.jws"), "-c", str(line.config()), env=env
    )
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout)["max_certificates"] == quota

    metrics_port = _free_port()
    process = SignerProcess(line, config=line.config(metrics_port=metrics_port))
    process.start()
    try:
        recorder = Recorder()
        hub = SimHub(PORTS, line.board, supply=quota + 2)
        station = await run_station(
            line.station_settings("st-a", tmp_path / "st-a", ports=PORTS),
            hub,
            line.passphrase,
            timeout_s=60,
            sinks=(recorder,),
        )
        scrape = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        metrics = scrape.text
    finally:
        process.stop()
    assert station.outcomes["provisioned"] == quota, station.outcomes
    reasons = Counter(r.reason for r in station.results if r.outcome != "provisioned")
    assert reasons == {"signer_quota_exhausted": 2}, reasons
    # The supervisor sees why: the port's state carries the signer's reason, and the signer's metrics.
    assert any(u.reason and "quota" in u.reason for u in recorder.ports)
    assert re.search(r'factoryd_signer_quota_remaining\{lot="demo-lot"\} 0\.0', metrics), metrics
    assert re.search(
        r'factoryd_signer_refusals_total\{lot="demo-lot",reason="quota_exhausted"\} 2\.0', metrics
    )
    ledger = open_issuance_ledger(pg_url)
    try:
        assert ledger.signed_count(LOT) == quota
    finally:
        ledger.close()
    assert _refusal_codes(pg_url)["quota_exhausted"] == 2


def _free_port() -> int:
    from tests.helpers.signer import free_port

    return free_port()


async def test_signer_killed_mid_run_loses_and_duplicates_nothing(
    line: SignerLine, signer: SignerProcess, pg_url: str
) -> None:
    recorder = Recorder()
    supply = Supply(line, KILL_BOARDS)
    settings = line.station_settings("st-a", line.root / "st-a", ports=PORTS, hold_s=60.0)
    killed = asyncio.Event()

    async def kill_and_restart() -> None:
        with Ledger.open(pg_url) as ledger:
            while ledger.progress(LOT).provisioned < 3:
                await asyncio.sleep(0.02)
        signer.kill()
        killed.set()
        await asyncio.sleep(1.0)  # boards arriving now wait at the issue step
        await asyncio.to_thread(signer.start)

    restart = asyncio.create_task(kill_and_restart())
    station = await run_station(settings, supply.hub, line.passphrase, timeout_s=90, sinks=(recorder,))
    await restart
    assert killed.is_set()
    assert station.outcomes["provisioned"] == KILL_BOARDS, (station.outcomes, station.results[-3:])
    _check_line(pg_url, [supply], expect_provisioned=KILL_BOARDS)
    # While the signer was down, boards were held at the issue step and the port said why.
    assert any(u.reason and "signer unreachable" in u.reason for u in recorder.ports)
    assert any(e.kind == "retry" and e.reason == "signer_unavailable" for e in recorder.events)


@pytest.mark.mqtt
async def test_the_signer_reports_over_mqtt(line: SignerLine, mqtt_broker: MosquittoBroker) -> None:
    """Its presence (retained, last will) and each refusal as an event, like a station's."""
    async with MqttRecorder(mqtt_broker, "factory/test-line/signer-1/#") as recorder:
        process = SignerProcess(line, config=line.config(mqtt_port=mqtt_broker.port))
        await asyncio.to_thread(process.start)
        try:
            await recorder.wait_for(lambda: (recorder.latest("/status") or {}).get("state") == "online")
            with line.client("st-a") as client:
                refused = await asyncio.to_thread(
                    client.post, "/v1/certificates", json=_body("no-such-device", "aa11", None)
                )
            assert refused.status_code == 403
            await recorder.wait_for(
                lambda: any(e.get("reason") == "unknown_device" for e in recorder.on("/events"))
            )
        finally:
            assert await asyncio.to_thread(process.stop) == 0
        await recorder.wait_for(lambda: (recorder.latest("/status") or {}).get("state") == "offline")
    event = next(e for e in recorder.on("/events") if e.get("reason") == "unknown_device")
    assert event["lot"] == LOT
    assert event["step"] == "issue"


async def test_a_station_started_before_its_signer_waits_and_resumes(line: SignerLine, pg_url: str) -> None:
    """The signer is down when the station starts: the station pauses intake and resumes by itself."""
    supply = Supply(line, 4)
    process = SignerProcess(line)
    recorder = Recorder()

    async def start_signer_late() -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(process.start)

    late = asyncio.create_task(start_signer_late())
    try:
        station = await run_station(
            line.station_settings("st-a", line.root / "st-a", ports=PORTS),
            supply.hub,
            line.passphrase,
            timeout_s=60,
            sinks=(recorder,),
        )
        await late
    finally:
        process.stop()
    assert station.outcomes["provisioned"] == 4, station.outcomes
    assert station.pauses_total >= 1  # intake was paused for the signer, then resumed by itself
    _check_line(pg_url, [supply], expect_provisioned=4)


async def test_a_revoked_station_is_refused_after_a_reload(line: SignerLine, signer: SignerProcess) -> None:
    with line.client("st-gone") as client:
        assert client.get("/healthz").status_code == 200
    ca = load_line_ca(line.line_ca_cert.parent, line.passphrase)
    cert, _key = line.station_cert("st-gone")
    revoke_station_cert(ca, cert.read_bytes())
    signer.reload()

    def refused() -> bool:
        try:
            with line.client("st-gone") as client:
                client.get("/healthz")
        except httpx.HTTPError:
            return True
        return False

    for _ in range(100):  # the signal is handled asynchronously
        if refused():
            break
        await asyncio.sleep(0.05)
    assert refused()
    with line.client("st-other") as client:  # everyone else carries on
        assert client.get("/healthz").status_code == 200


async def test_a_genuine_parts_lot_is_attested_again_by_the_signer(tmp_path: Path, pg_url: str) -> None:
    """`attestation = required`: the signer verifies each board's evidence itself, and refuses without."""
    line = make_signer_line(tmp_path, pg_url, ids=10, vendor=SimVendorCa.make(seed=7))
    process = SignerProcess(line)
    process.start()
    try:
        supply = Supply(line, 3)
        station = await run_station(
            line.station_settings("st-a", tmp_path / "st-a", ports=PORTS),
            supply.hub,
            line.passphrase,
            timeout_s=60,
        )
        device_id, serial, job = _reserve(pg_url, "st-a")
        with line.client("st-a") as client:
            # A CSR for the reserved ID, but no evidence that a genuine secure element made its key.
            bare = await asyncio.to_thread(
                client.post, "/v1/certificates", json=_body(device_id, serial, job)
            )
    finally:
        process.stop()
    assert station.outcomes["provisioned"] == 3, station.outcomes
    _check_line(pg_url, [supply], expect_provisioned=3)
    assert bare.status_code == 403
    assert bare.json()["code"] == "attestation_missing"
    # The evidence the signer checked is what the manifest carries for each device.
    with Ledger.open(pg_url) as ledger:
        entries = ledger.issued_certificates(LOT)
    assert len(entries) == 3
    assert all(e.genuineness is not None and e.genuineness["method"] == "attestation" for e in entries)
