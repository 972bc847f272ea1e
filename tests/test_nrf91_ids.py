"""nrf91-at lots whose device IDs derive from each modem's IMEI; the customer's list holds the allowed IDs."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from factoryd.demo import DemoOptions, demo_settings
from factoryd.ledger import Ledger, LotProfile, LotState
from factoryd.pki.testca import make_test_pki
from factoryd.service import StationPaths, parse_bundle, store_bundle
from factoryd.sim.nrf91 import SimNrf91Modem, imei_for
from factoryd.sim.secure_element import SimSecureElement, seeded_se_serial
from tests.test_attestation_line import _audit as audit_entries
from tests.test_nrf91_job import LOT, ModemLine, check_modem_holds, modems

IMEI_ID_FORMAT = "regex:nrf-[0-9]{15}"


def numbered_modem(n: int) -> SimNrf91Modem:
    """The simulated modem number ``n`` (its IMEI follows from its serial)."""
    return SimNrf91Modem(se=SimSecureElement(serial=seeded_se_serial(n)))


def derived_id(n: int) -> str:
    return f"nrf-{imei_for(seeded_se_serial(n))}"


def _prepare(settings: Any, passphrase: bytes, profile: LotProfile, allowed: list[str]) -> None:
    upload = secrets.token_urlsafe(12).encode()
    pki = make_test_pki(passphrase=upload)
    paths = StationPaths(settings.station.state_dir)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with Ledger.open(settings.ledger_url) as ledger:
        lot = ledger.create_lot(
            LOT, customer="acme", profile=profile, target_quantity=len(allowed), actor="t"
        )
        store_bundle(paths, passphrase, LOT, parse_bundle(pki.pkcs12, upload, lot))
        ledger.import_ids(LOT, "\n".join(allowed).encode(), filename="ids.txt", actor="t")
        ledger.set_lot_state(LOT, LotState.ACTIVE, actor="t")


async def make_imei_line(tmp_path: Path, allowed: list[str], *, ports: int) -> ModemLine:
    """An SQLite ledger with an active nrf91-at lot deriving IDs from IMEIs; ``allowed`` is its list."""
    settings = demo_settings(
        DemoOptions(state_dir=tmp_path, boards=len(allowed), ports=ports, lot=LOT), tmp_path
    )
    passphrase = secrets.token_urlsafe(16).encode()
    profile = LotProfile(protocol="nrf91-at", device_id_from="imei", id_format=IMEI_ID_FORMAT)
    await asyncio.to_thread(_prepare, settings, passphrase, profile, allowed)
    return ModemLine(settings, passphrase)


async def test_each_modem_gets_exactly_the_id_of_its_imei(tmp_path: Path) -> None:
    # The list holds more than the line makes, in an order unrelated to the modems'.
    allowed = [derived_id(n) for n in reversed(range(1, 11))]
    line = await make_imei_line(tmp_path, allowed, ports=4)
    made: list[SimNrf91Modem] = []

    def factory() -> SimNrf91Modem:
        modem = numbered_modem(len(made) + 1)
        made.append(modem)
        return modem

    station = await line.run(modems(factory, ports=4, supply=6))
    assert station.outcomes == Counter({"provisioned": 6})
    with line.ledger() as ledger:
        records = {r.hw_serial: r for r in ledger.provisioned_devices(LOT)}
        progress = ledger.progress(LOT)
    assert (progress.available, progress.reserved, progress.provisioned) == (4, 0, 6)
    for modem in made:
        record = records[modem.serial_text]
        assert record.device_id == f"nrf-{modem.imei}"
        check_modem_holds(modem, record.cert_der)


async def test_a_modem_whose_imei_is_not_on_the_list_is_refused_and_consumes_nothing(tmp_path: Path) -> None:
    line = await make_imei_line(tmp_path, [derived_id(1), derived_id(2)], ports=1)
    with line.ledger() as ledger:
        before = ledger.progress(LOT)
    stranger = numbered_modem(99)
    station = await line.run(modems(lambda: stranger, ports=1, supply=1))
    assert station.outcomes == Counter({"refused": 1})
    assert station.results[0].reason == "refused_board"
    assert stranger.keygen_count == 0
    with line.ledger() as ledger:
        assert ledger.progress(LOT) == before
        assert ledger.find_by_serial(LOT, stranger.serial_text) is None
        refusals = audit_entries(ledger, "board.refused")
    assert [subject for subject, _details in refusals] == [stranger.serial_text]
    assert refusals[0][1]["device_id"] is None


async def test_a_reinserted_modem_is_rechecked_with_the_same_id(tmp_path: Path) -> None:
    line = await make_imei_line(tmp_path, [derived_id(1), derived_id(2)], ports=1)
    modem = numbered_modem(2)
    first = await line.run(modems(lambda: modem, ports=1, supply=1))
    assert first.outcomes == Counter({"provisioned": 1})
    again = await line.run(modems(lambda: modem, ports=1, supply=1))
    assert again.outcomes == Counter({"rechecked": 1})
    assert again.results[0].device_id == derived_id(2) == first.results[0].device_id
    assert modem.keygen_count == 1
    with line.ledger() as ledger:
        assert (ledger.progress(LOT).provisioned, ledger.progress(LOT).available) == (1, 1)


def test_an_imei_lot_needs_an_id_format_its_ids_match() -> None:
    with pytest.raises(ValidationError, match=r'id_format = "regex:nrf\\-\[0-9\]\{15\}"'):
        LotProfile(protocol="nrf91-at", device_id_from="imei")
    with pytest.raises(ValidationError, match="does not match"):
        LotProfile(protocol="nrf91-at", device_id_from="imei", id_format="regex:dev-[0-9]+")
    custom = LotProfile(
        protocol="nrf91-at",
        device_id_from="imei",
        device_id_template="acme-{imei}-a",
        id_format="regex:acme-.*",
    )
    assert custom.derived_device_id("352656100123456") == "acme-352656100123456-a"


def test_only_imei_profiles_can_derive_ids_from_the_imei() -> None:
    with pytest.raises(ValidationError, match=r"does not identify its boards by an IMEI.*nrf91-at"):
        LotProfile(protocol="factoryd-v1", device_id_from="imei", id_format=IMEI_ID_FORMAT)


@pytest.mark.parametrize("template", ["nrf", "{imei}-{imei}", "{imei}-{lot}", "nrf-{imei"])
def test_a_template_needs_the_imei_exactly_once(template: str) -> None:
    with pytest.raises(ValidationError, match="exactly once"):
        LotProfile(protocol="nrf91-at", device_id_template=template)
