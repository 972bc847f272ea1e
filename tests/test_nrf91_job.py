"""The nrf91-at job through the real pipeline: simulated nRF91 modems behind PTYs, a real daemon, a ledger."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from factoryd.config import Settings
from factoryd.daemon import Daemon, DaemonHooks
from factoryd.demo import DemoOptions, demo_settings, run_demo, simulated_operator
from factoryd.errors import BundleError, IssuanceError
from factoryd.jobs.nrf91 import Nrf91Session, check_chain_fits, pem_text, sha256_upper
from factoryd.jobs.pipeline import PipelineSettings
from factoryd.jobs.scheduler import Station
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.model import DeviceState
from factoryd.pki.bundle import load_pkcs12_bundle
from factoryd.pki.testca import make_test_pki
from factoryd.protocol.nrf91 import CredentialType
from factoryd.service import StationPaths, parse_bundle, store_bundle
from factoryd.sim.board import Fault, FaultPlan
from factoryd.sim.hub import SimHub
from factoryd.sim.nrf91 import SimNrf91Modem, serve_nrf91_pty
from factoryd.sim.secure_element import SimSecureElement, seeded_se_serial

LOT = "nrf-lot"
TAG = 16_842_753


@dataclass
class ModemLine:
    """A prepared nrf91-at lot and what runs a station on it."""

    settings: Settings
    passphrase: bytes

    def ledger(self) -> Ledger:
        return Ledger.open(self.settings.ledger_url)

    async def run(self, hub: SimHub, *, timeout_s: float = 25.0) -> Station:
        """Run a daemon until the hub's supply is used up; the simulated operator acknowledges ports."""
        hooks = DaemonHooks(
            hub=hub,
            passphrase=self.passphrase,
            stop_when=lambda _station: hub.exhausted,
            on_ready=simulated_operator,
        )
        async with asyncio.timeout(timeout_s):
            return await Daemon(self.settings, hooks).run()


def _prepare(
    settings: Settings,
    passphrase: bytes,
    profile: LotProfile,
    ids: int,
    chain_extra: int,
    *,
    check: bool = True,
) -> None:
    upload = secrets.token_urlsafe(12).encode()
    pki = make_test_pki(passphrase=upload)
    paths = StationPaths(settings.station.state_dir)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with Ledger.open(settings.ledger_url) as ledger:
        lot = ledger.create_lot(LOT, customer="acme", profile=profile, target_quantity=ids, actor="test")
        # check=False stores the bundle past the set-up checks (as a station of an older version did).
        bundle = parse_bundle(pki.pkcs12, upload, lot) if check else load_pkcs12_bundle(pki.pkcs12, upload)
        store_bundle(paths, passphrase, LOT, bundle)
        listing = "\n".join(str(uuid.uuid4()) for _ in range(ids))
        ledger.import_ids(LOT, listing.encode(), filename="ids.txt", actor="test")
        ledger.set_lot_state(LOT, LotState.ACTIVE, actor="test")


async def make_modem_line(
    tmp_path: Path, *, ids: int = 24, ports: int = 4, check: bool = True, **profile: Any
) -> ModemLine:
    """An SQLite ledger with an active nrf91-at lot (test CA, UUID list) under tmp_path."""
    options = DemoOptions(state_dir=tmp_path, boards=ids, ports=ports, lot=LOT)
    settings = demo_settings(options, tmp_path)
    passphrase = secrets.token_urlsafe(16).encode()
    lot_profile = LotProfile(protocol="nrf91-at", **profile)
    await asyncio.to_thread(_prepare, settings, passphrase, lot_profile, ids, 0, check=check)
    return ModemLine(settings, passphrase)


def modems(factory: Callable[[], SimNrf91Modem], ports: int, supply: int) -> SimHub:
    return SimHub(ports, factory, supply=supply)


def check_modem_holds(modem: SimNrf91Modem, cert_der: bytes) -> None:
    """The modem's tag holds the recorded certificate, and its key is the certificate's."""
    stored = modem.credential(TAG, CredentialType.CLIENT_CERT)
    assert stored is not None
    cert = x509.load_pem_x509_certificate(stored)
    assert cert.public_bytes(Encoding.DER) == cert_der
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) == modem.key_public_point(TAG)


async def test_sixteen_modems_with_faults_get_distinct_ids_and_verified_write_backs(tmp_path: Path) -> None:
    line = await make_modem_line(tmp_path, ids=40, ports=16)
    made: list[SimNrf91Modem] = []

    def factory() -> SimNrf91Modem:
        n = len(made)
        faults = FaultPlan(
            corrupt_byte=0.3, drop_reply=0.3, reset_mid_write=0.3, readback_differs=0.3, boot_garbage=0.3,
            seed=n, per_power_on=True,
        )  # fmt: skip
        modem = SimNrf91Modem(
            se=SimSecureElement(serial=seeded_se_serial(n + 1)), faults=faults, echo=n % 2 == 0,
            urc_rate=0.2, cme_error=0.05 if n % 3 == 0 else 0.0, null_param=n % 4 == 0,
        )  # fmt: skip
        made.append(modem)
        return modem

    station = await line.run(modems(factory, ports=16, supply=16))
    assert station.outcomes == Counter({"provisioned": 16})
    injected: Counter[Fault] = Counter()
    for modem in made:
        injected.update(modem.injected)
    # Every fault kind of the plan hit some modem, and the job rode each of them out.
    assert set(injected) >= {
        Fault.CORRUPT_BYTE,
        Fault.DROP_REPLY,
        Fault.RESET_MID_WRITE,
        Fault.READBACK_DIFFERS,
    }
    assert sum(m.resets for m in made) == injected[Fault.RESET_MID_WRITE]
    with line.ledger() as ledger:
        records = {r.hw_serial: r for r in ledger.provisioned_devices(LOT)}
        progress = ledger.progress(LOT)
    assert (progress.provisioned, progress.reserved) == (16, 0)
    # Exactly once: 16 IDs for 16 IMEIs, each bound to its modem.
    assert len({r.device_id for r in records.values()}) == 16
    assert set(records) == {m.serial_text for m in made}
    for modem in made:
        record = records[modem.serial_text]
        check_modem_holds(modem, record.cert_der)
        # The write-back: what the modem stores hashes to what the station wrote.
        chain = modem.credential(TAG, CredentialType.ROOT_CA)
        assert chain is not None
        assert chain.decode().startswith("-----BEGIN CERTIFICATE-----")


async def test_written_credentials_hash_as_the_modem_lists_them(tmp_path: Path) -> None:
    line = await make_modem_line(tmp_path, ids=2, ports=1)
    modem = SimNrf91Modem()
    hub = modems(lambda: modem, ports=1, supply=1)
    station = await line.run(hub)
    assert station.outcomes == Counter({"provisioned": 1})
    cert_pem = modem.credential(TAG, CredentialType.CLIENT_CERT)
    assert cert_pem is not None
    assert b"\r\n" in cert_pem  # CRLF line ends, as Nordic's installer writes
    assert sha256_upper(pem_text(cert_pem)) == sha256_upper(cert_pem.decode())
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert (
        cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == station.results[0].device_id
    )
    assert modem.cfun == 4


async def test_old_modem_firmware_is_refused_before_an_id_is_reserved(tmp_path: Path) -> None:
    line = await make_modem_line(tmp_path, ids=3, ports=1, modem_fw_min="1.3.4")
    with line.ledger() as ledger:
        before = ledger.progress(LOT)
    hub = modems(lambda: SimNrf91Modem(modem_fw="mfw_nrf9160_1.3.1"), ports=1, supply=1)
    station = await line.run(hub)
    assert station.outcomes == Counter({"refused": 1})
    assert station.results[0].reason == "refused_board"
    with line.ledger() as ledger:
        after = ledger.progress(LOT)
    assert (after.available, after.reserved, after.provisioned) == (
        before.available,
        before.reserved,
        before.provisioned,
    )


async def test_modem_with_credentials_in_the_tag_is_refused_without_rework(tmp_path: Path) -> None:
    line = await make_modem_line(tmp_path, ids=2, ports=1)
    modem = SimNrf91Modem()
    modem.store[(TAG, CredentialType.CLIENT_CERT)] = (
        b"-----BEGIN CERTIFICATE-----\r\nAAAA\r\n-----END CERTIFICATE-----"
    )
    station = await line.run(modems(lambda: modem, ports=1, supply=1))
    assert station.outcomes == Counter({"refused": 1})
    assert modem.keygen_count == 0
    with line.ledger() as ledger:
        assert ledger.progress(LOT).reserved == 0


async def test_rework_deletes_and_provisions_again(tmp_path: Path) -> None:
    line = await make_modem_line(tmp_path, ids=2, ports=1, allow_rework=True)
    modem = SimNrf91Modem()
    old = b"-----BEGIN CERTIFICATE-----\r\nAAAA\r\n-----END CERTIFICATE-----"
    modem.store[(TAG, CredentialType.CLIENT_CERT)] = old
    station = await line.run(modems(lambda: modem, ports=1, supply=1))
    assert station.outcomes == Counter({"provisioned": 1})
    assert modem.credential(TAG, CredentialType.CLIENT_CERT) != old
    with line.ledger() as ledger:
        record = ledger.find_by_serial(LOT, modem.serial_text)
        assert record is not None
        assert record.state is DeviceState.PROVISIONED
        check_modem_holds(modem, record.cert_der or b"")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.WRONG_CN, "csr_rejected"),
        (Fault.BAD_CSR_SIGNATURE, "csr_rejected"),
        (Fault.WEAK_KEY, "csr_rejected"),
    ],
)
async def test_bad_csr_fails_the_job_and_nothing_is_written(
    tmp_path: Path, fault: Fault, reason: str
) -> None:
    line = await make_modem_line(tmp_path, ids=2, ports=1)
    modem = SimNrf91Modem(faults=FaultPlan.only(fault))
    station = await line.run(modems(lambda: modem, ports=1, supply=1))
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == reason
    assert modem.credential(TAG, CredentialType.CLIENT_CERT) is None
    assert modem.credential(TAG, CredentialType.ROOT_CA) is None


def test_a_chain_too_long_for_the_line_is_refused_naming_the_limit() -> None:
    chain = make_test_pki(passphrase=b"x").root_pem * 3
    check_chain_fits(LotProfile(protocol="nrf91-at"), chain)
    with pytest.raises(BundleError, match=r"more than the 1024-byte AT line"):
        check_chain_fits(LotProfile(protocol="nrf91-at", at_line_max_bytes=1024), chain, lot="lot x")


def test_a_bundle_whose_chain_cannot_fit_is_refused_at_lot_set_up(tmp_path: Path) -> None:
    """The chain is checked when the bundle is stored, not on the line (CLI and API both parse here)."""
    upload = b"upload-passphrase"
    pki = make_test_pki(passphrase=upload)
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        profile = LotProfile(protocol="nrf91-at", at_line_max_bytes=1024)
        lot = ledger.create_lot(LOT, customer="acme", profile=profile, target_quantity=1, actor="test")
        with pytest.raises(BundleError, match=rf"lot {LOT}: .*more than the 1024-byte AT line"):
            parse_bundle(pki.pkcs12, upload, lot)
        roomy = ledger.create_lot("roomy", customer="acme", profile=LotProfile(protocol="nrf91-at"),
                                  target_quantity=1, actor="test")  # fmt: skip
        assert parse_bundle(pki.pkcs12, upload, roomy).chain


async def test_a_lot_whose_chain_cannot_fit_reserves_no_id_and_makes_no_key(tmp_path: Path) -> None:
    line = await make_modem_line(tmp_path, ids=2, ports=1, check=False, at_line_max_bytes=1024)
    modem = SimNrf91Modem()
    station = await line.run(modems(lambda: modem, ports=1, supply=1))
    assert station.outcomes == Counter({"failed": 1})
    assert station.results[0].reason == "bundle"
    assert modem.keygen_count == 0
    with line.ledger() as ledger:
        assert ledger.progress(LOT).reserved == 0


async def test_a_reinserted_modem_is_rechecked_not_reissued(tmp_path: Path) -> None:
    line = await make_modem_line(tmp_path, ids=3, ports=1)
    modem = SimNrf91Modem()
    await line.run(modems(lambda: modem, ports=1, supply=1))
    cert_before = modem.credential(TAG, CredentialType.CLIENT_CERT)
    station = await line.run(modems(lambda: modem, ports=1, supply=1))
    assert station.outcomes == Counter({"rechecked": 1})
    assert modem.keygen_count == 1
    assert modem.credential(TAG, CredentialType.CLIENT_CERT) == cert_before
    # A modem whose certificate is not the recorded one is refused, not re-checked.
    modem.store[(TAG, CredentialType.CLIENT_CERT)] = (
        b"-----BEGIN CERTIFICATE-----\r\nAAAA\r\n-----END CERTIFICATE-----"
    )
    station = await line.run(modems(lambda: modem, ports=1, supply=1))
    assert station.outcomes == Counter({"refused": 1})
    with line.ledger() as ledger:
        assert ledger.progress(LOT).provisioned == 1


async def test_demo_with_the_nrf91_profile(tmp_path: Path) -> None:
    result = await run_demo(
        DemoOptions(ports=8, boards=16, fault_rate=0.1, seed=5, profile="nrf91-at", state_dir=tmp_path)
    )
    assert sum(result.outcomes.values()) >= 16
    assert result.provisioned >= 14
    assert result.duplicate_ids == 0
    # The demo checked every device end to end: CA signature, CN, certificate and key in the modem.
    assert result.certificates_verified == result.lot_provisioned == result.provisioned
    assert result.manifest_count == result.provisioned


def _identity_pem(modem: SimNrf91Modem) -> str:
    return (
        modem.identity_key.public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


async def test_a_lot_with_identity_keys_checks_each_modems_attestation(tmp_path: Path) -> None:
    genuine, impostor, unlisted = SimNrf91Modem(), SimNrf91Modem(), SimNrf91Modem()
    keys = {
        genuine.device_uuid.hex(): _identity_pem(genuine),
        # The impostor claims a listed UUID but signs with another key.
        impostor.device_uuid.hex(): _identity_pem(unlisted),
    }
    line = await make_modem_line(tmp_path, ids=4, ports=1, nrf91_identity_keys=keys)
    supply = iter([genuine, impostor, unlisted])
    station = await line.run(modems(lambda: next(supply), ports=1, supply=3))
    by_serial = {r.hw_serial: r for r in station.results}
    assert by_serial[genuine.serial_text].outcome == "provisioned"
    # Both are refused on their attestation token, before an ID is reserved and a key is made.
    assert by_serial[impostor.serial_text].outcome == "refused"
    assert by_serial[unlisted.serial_text].outcome == "refused"
    assert impostor.keygen_count == unlisted.keygen_count == 0
    with line.ledger() as ledger:
        progress = ledger.progress(LOT)
    assert (progress.provisioned, progress.reserved) == (1, 0)


def test_identity_keys_must_be_p256_keys_by_device_uuid() -> None:
    with pytest.raises(ValidationError, match="not a device UUID"):
        LotProfile(protocol="nrf91-at", nrf91_identity_keys={"xyz": "-----BEGIN PUBLIC KEY-----"})
    with pytest.raises(ValidationError, match="not a PEM public key"):
        LotProfile(protocol="nrf91-at", nrf91_identity_keys={"00" * 16: "nope"})


async def test_a_write_longer_than_the_line_limit_writes_nothing() -> None:
    modem = SimNrf91Modem()
    async with (
        serve_nrf91_pty(modem) as pty,
        Nrf91Session(SimHub(1, SimNrf91Modem), "1", pty.path, PipelineSettings(station="t")) as session,
    ):
        await session.identify()
        session.client.max_line = 300
        contents = {CredentialType.ROOT_CA: "A" * 100, CredentialType.CLIENT_CERT: "B" * 400}
        with pytest.raises(IssuanceError, match="more than the 300-byte line limit"):
            await session._write_verified(TAG, contents)
    assert modem.credential(TAG, CredentialType.ROOT_CA) is None
