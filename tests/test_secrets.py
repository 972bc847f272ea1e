"""Secrets stay secret: after a full run with debug logging, the CA key, the passphrases and API
tokens appear nowhere in the logs, the database, the MQTT payloads or the metrics."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from factoryd.api import TokenStore
from factoryd.config import load_settings
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.log import configure_logging
from factoryd.pki.testca import make_test_pki
from factoryd.service import StationPaths, parse_bundle, store_bundle
from factoryd.sim.board import SimBoard
from factoryd.sim.hub import SimHub
from tests.helpers.mqtt_broker import MosquittoBroker, MqttRecorder

LOT = "secret-lot"


@pytest.mark.mqtt
async def test_no_secret_leaks_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mqtt_broker: MosquittoBroker
) -> None:
    station_pass = b"station-" + secrets.token_hex(12).encode()
    upload_pass = b"upload-" + secrets.token_hex(12).encode()
    settings = load_settings(
        None,
        station={"name": "secret-station", "state_dir": tmp_path},
        hub={"backend": "sim", "sim": {"ports": 2, "boards": 4}, "power_cycle_off_s": 0},
        jobs={"lot": LOT, "rescan_s": 0.1},
        metrics={"enabled": False},
        api={"enabled": True, "port": 0},
        mqtt={"enabled": True, "port": mqtt_broker.port},
        log={"level": "debug", "format": "json"},
    )
    configure_logging("debug", "json")
    pki = make_test_pki(passphrase=upload_pass)
    with Ledger.open(settings.ledger_url) as ledger:
        info = ledger.create_lot(LOT, customer="c", profile=LotProfile(), target_quantity=4, actor="test")
        bundle = parse_bundle(pki.pkcs12, upload_pass, info)
        store_bundle(StationPaths(tmp_path), station_pass, LOT, bundle)
        ids = "\n".join(f"00000000-0000-4000-8000-{n:012d}" for n in range(8))
        ledger.import_ids(LOT, ids.encode(), filename="ids.txt", actor="test")
        ledger.set_lot_state(LOT, LotState.ACTIVE, actor="test")
    with TokenStore.open(settings.ledger_url) as tokens:
        _, api_token = tokens.create("wall-screen", "supervisor")

    async def use_the_api(station: object) -> None:
        # Authenticated calls while the line runs: the token travels, but must not be recorded.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}") as client:
            for path in ("/ports", "/lots", f"/lots/{LOT}/progress"):
                response = await client.get(path, headers={"Authorization": f"Bearer {api_token}"})
                assert response.status_code == 200, response.text

    hub = SimHub(2, SimBoard, supply=4)
    daemon = Daemon(
        settings, DaemonHooks(hub=hub, passphrase=station_pass, stop_when=lambda _s: hub.exhausted)
    )
    async with MqttRecorder(mqtt_broker) as recorder:
        station = await daemon.run()
        await recorder.wait_for(lambda: len(recorder.messages) > 10)
        await asyncio.sleep(0.2)
    assert station.outcomes["provisioned"] == 4

    key = bundle.private_key
    scalar = key.private_numbers().private_value  # type: ignore[union-attr]
    forbidden = {
        "station passphrase": station_pass,
        "upload passphrase": upload_pass,
        "API token": api_token.encode(),
        # fdt_<id>_<secret>: the secret is urlsafe base64 and may itself contain "_".
        "API token secret part": api_token.split("_", 2)[2].encode(),
        "CA key scalar (hex)": f"{scalar:x}".encode(),
        "CA key scalar (decimal)": str(scalar).encode(),
        "CA key DER": key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "CA key PEM body": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).splitlines()[1],
    }
    captured = capsys.readouterr()
    logs = (captured.out + captured.err).encode()
    assert b'"level": "debug"' in logs  # debug logging really was on
    database = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    mqtt = b"".join(bytes(m.payload) for m in recorder.messages)  # type: ignore[arg-type]
    metrics = daemon.metrics.exposition()
    stores = {"logs": logs, "database": database, "mqtt payloads": mqtt, "metrics": metrics}
    for where, blob in stores.items():
        assert blob, f"{where} is empty: the check would prove nothing"
        for what, secret in forbidden.items():
            assert secret not in blob, f"{what} found in {where}"
            assert secret.hex().encode() not in blob, f"{what} (hex) found in {where}"
    # At rest the key file is encrypted and private.
    key_files = list((tmp_path / "bundles").rglob("*key*"))
    assert key_files
    for path in key_files:
        assert path.stat().st_mode & 0o077 == 0
        data = path.read_bytes()
        assert b"ENCRYPTED" in data
        assert forbidden["CA key PEM body"] not in data


MATTER_LOT = "matter-secret-lot"


@pytest.mark.mqtt
async def test_no_matter_passcode_leaks_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mqtt_broker: MosquittoBroker
) -> None:
    """The setup passcodes (and the codes that contain them) are nowhere but sealed in the ledger."""
    from factoryd.matter.admin import setup_matter_lot
    from factoryd.matter.payload import parse_qr_payload
    from factoryd.matter.profile import MatterProfile
    from factoryd.matter.testing import TEST_PRODUCT_ID, TEST_VENDOR_ID, make_matter_test_pki

    station_pass = b"station-" + secrets.token_hex(12).encode()
    upload_pass = b"upload-" + secrets.token_hex(12).encode()
    settings = load_settings(
        None,
        station={"name": "secret-station", "state_dir": tmp_path},
        hub={"backend": "sim", "sim": {"ports": 2, "boards": 4}, "power_cycle_off_s": 0},
        jobs={"lot": MATTER_LOT, "rescan_s": 0.1},
        metrics={"enabled": False},
        mqtt={"enabled": True, "port": mqtt_broker.port},
        log={"level": "debug", "format": "json"},
    )
    configure_logging("debug", "json")
    pki = make_matter_test_pki(passphrase=upload_pass)
    profile = LotProfile(
        matter=MatterProfile(vendor_id=TEST_VENDOR_ID, product_ids=(TEST_PRODUCT_ID,), iterations=1000)
    )
    paths = StationPaths(tmp_path)
    with Ledger.open(settings.ledger_url) as ledger:
        info = ledger.create_lot(MATTER_LOT, customer="c", profile=profile, target_quantity=4, actor="test")
        store_bundle(paths, station_pass, MATTER_LOT, parse_bundle(pki.pkcs12, upload_pass, info))
        setup_matter_lot(
            ledger, paths, station_pass, MATTER_LOT, paa=pki.paa_pem, cd=pki.cd_der, actor="test"
        )
        ids = "\n".join(f"00000000-0000-4000-8000-{n:012d}" for n in range(8))
        ledger.import_ids(MATTER_LOT, ids.encode(), filename="ids.txt", actor="test")
        ledger.set_lot_state(MATTER_LOT, LotState.ACTIVE, actor="test")

    hub = SimHub(2, SimBoard, supply=4)
    daemon = Daemon(
        settings, DaemonHooks(hub=hub, passphrase=station_pass, stop_when=lambda _s: hub.exhausted)
    )
    async with MqttRecorder(mqtt_broker) as recorder:
        station = await daemon.run()
        await recorder.wait_for(lambda: len(recorder.messages) > 10)
        await asyncio.sleep(0.2)
    assert station.outcomes["provisioned"] == 4

    with Ledger.open(settings.ledger_url, onboarding_secret=station_pass) as ledger:
        codes = [
            ledger.onboarding_codes(MATTER_LOT, d.device_id) for d in ledger.provisioned_devices(MATTER_LOT)
        ]
    assert len(codes) == 4
    assert all(c is not None for c in codes)
    forbidden: dict[str, bytes] = {}
    for n, code in enumerate(c for c in codes if c is not None):
        passcode = parse_qr_payload(code.qr_payload).passcode
        forbidden[f"passcode {n} (decimal)"] = str(passcode).encode()
        forbidden[f"passcode {n} (8 digits)"] = f"{passcode:08d}".encode()
        forbidden[f"QR payload {n}"] = code.qr_payload.encode()
        forbidden[f"manual code {n}"] = code.manual_code.encode()
    captured = capsys.readouterr()
    logs = (captured.out + captured.err).encode()
    assert b'"level": "debug"' in logs  # debug logging really was on
    database = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*"))
    mqtt = b"".join(bytes(m.payload) for m in recorder.messages)  # type: ignore[arg-type]
    boards = b"".join(data for board in hub.finished for data in board.se.objects.values())
    stores = {"logs": logs, "database": database, "mqtt payloads": mqtt, "board storage": boards}
    for where, blob in stores.items():
        assert blob, f"{where} is empty: the check would prove nothing"
        for what, secret in forbidden.items():
            assert secret not in blob, f"{what} found in {where}"
    # The sealed codes are there, and the board holds the verifier: both checks look at real data.
    assert b"matter_device" in database
    from factoryd.protocol.messages import ObjectId

    assert all(set(board.se.objects) == set(ObjectId) for board in hub.finished)
