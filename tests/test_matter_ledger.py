"""Sealed onboarding codes on SQLite and PostgreSQL: two stations, one secret, one salt per lot."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator

import pytest

from factoryd.errors import InputError, LedgerError
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.ledger.testing import throwaway_postgres_database
from factoryd.matter.payload import OnboardingCodes, SetupPayload
from factoryd.matter.profile import MatterProfile

SECRET = b"line-passphrase"
ACTOR = "test"
CERT_DER = b"\x30\x03\x02\x01\x07"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this module's tests."""
    with throwaway_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh SQLite file, or the module's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
    return str(request.getfixturevalue("pg_url"))


def _matter_lot(ledger: Ledger, ids: list[str]) -> str:
    name = f"m-{uuid.uuid4().hex[:10]}"
    profile = LotProfile(matter=MatterProfile(vendor_id=0xFFF1, product_ids=(0x8000,)))
    ledger.create_lot(name, customer="ACME", profile=profile, target_quantity=len(ids), actor=ACTOR)
    ledger.import_ids(name, "\n".join(ids).encode(), fmt="txt", actor=ACTOR)
    ledger.set_lot_state(name, LotState.ACTIVE, actor=ACTOR)
    return name


def _codes(passcode: int) -> OnboardingCodes:
    return SetupPayload(3840, passcode, 0xFFF1, 0x8000).codes()


def _provision(ledger: Ledger, lot: str, serial: str, codes: OnboardingCodes) -> str:
    device_id = ledger.reserve(lot, serial, station="st", port="1", job_id=None, actor=ACTOR).device_id
    ledger.record_onboarding_codes(lot, device_id, codes, discriminator=3840, product_id=0x8000)
    ledger.mark_provisioned(
        lot,
        device_id,
        serial,
        cert_der=CERT_DER,
        cert_serial="0A",
        fingerprint_sha256=hashlib.sha256(CERT_DER).hexdigest(),
        station="st",
        port="1",
        actor=ACTOR,
    )
    return device_id


def test_two_stations_with_the_line_secret_read_each_others_codes(url: str) -> None:
    ids = [str(uuid.uuid4()) for _ in range(4)]
    with (
        Ledger.open(url, onboarding_secret=SECRET) as first,
        Ledger.open(url, onboarding_secret=SECRET) as second,
    ):
        lot = _matter_lot(first, ids)
        # Both stations seal their first codes at once: one salt for the lot, whoever wins the race.
        made: dict[str, str] = {}

        def station(ledger: Ledger, serial: str, passcode: int) -> None:
            made[serial] = _provision(ledger, lot, serial, _codes(passcode))

        threads = [
            threading.Thread(target=station, args=(first, "aa01", 20202021)),
            threading.Thread(target=station, args=(second, "bb02", 34567890)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert set(made) == {"aa01", "bb02"}
        assert second.onboarding_codes(lot, made["aa01"]) == _codes(20202021)
        assert first.onboarding_codes(lot, made["bb02"]) == _codes(34567890)
        records = first.onboarding_records(lot)
        assert {(r.hw_serial, r.codes) for r in records} == {
            ("aa01", _codes(20202021)),
            ("bb02", _codes(34567890)),
        }
    with Ledger.open(url, onboarding_secret=b"another line") as stranger, pytest.raises(LedgerError):
        stranger.onboarding_codes(lot, made["aa01"])


def test_a_retry_replaces_the_codes_and_only_reserved_devices_get_codes(url: str) -> None:
    ids = [str(uuid.uuid4()) for _ in range(2)]
    with Ledger.open(url, onboarding_secret=SECRET) as ledger:
        lot = _matter_lot(ledger, ids)
        device_id = ledger.reserve(lot, "cc03", station="st", port="1", job_id=None, actor=ACTOR).device_id
        ledger.record_onboarding_codes(lot, device_id, _codes(11223344), discriminator=1, product_id=0x8000)
        ledger.record_onboarding_codes(lot, device_id, _codes(55667788), discriminator=2, product_id=0x8000)
        with pytest.raises(InputError, match="not provisioned"):
            ledger.onboarding_codes(lot, device_id)
        other = next(i for i in ids if i != device_id)
        with pytest.raises(InputError, match="reserved"):
            ledger.record_onboarding_codes(lot, other, _codes(11223344), discriminator=1, product_id=0x8000)
        ledger.mark_provisioned(
            lot,
            device_id,
            "cc03",
            cert_der=CERT_DER,
            cert_serial="0B",
            fingerprint_sha256=hashlib.sha256(CERT_DER).hexdigest(),
            station="st",
            port="1",
            actor=ACTOR,
        )
        assert ledger.onboarding_codes(lot, device_id) == _codes(55667788)
        with pytest.raises(InputError, match="reserved"):
            ledger.record_onboarding_codes(
                lot, device_id, _codes(11223344), discriminator=1, product_id=0x8000
            )
