"""Matter lot set-up and the customer's onboarding-codes file.

Set-up refuses whole (nothing stored, with the reason) a PAI whose VID differs from the CD's or the
lot's, a PAI that is not a CA, a PAI that does not chain to the PAA, a malformed CD. The onboarding
file is decrypted by openssl cms, the customer's own tool, with the customer's key.
"""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from factoryd.errors import BundleError, InputError, LedgerError
from factoryd.jobs.lots import activation_gaps
from factoryd.ledger import Ledger, LotProfile
from factoryd.ledger.matter import OnboardingSecretMissingError
from factoryd.matter.admin import export_onboarding_codes, setup_matter_lot
from factoryd.matter.lot import MatterLotError, MatterStore
from factoryd.matter.payload import OnboardingCodes, parse_qr_payload
from factoryd.matter.profile import MatterProfile
from factoryd.matter.testing import TEST_PRODUCT_ID, TEST_VENDOR_ID, MatterTestPki, make_matter_test_pki
from factoryd.service import StationPaths, parse_bundle, store_bundle
from tests.helpers.openssl import openssl
from tests.helpers.station import LOT, make_line

STATION_PASS = b"station-pass-for-tests"
UPLOAD_PASS = b"upload-pass"


def _lot(
    tmp_path: Path, pki: MatterTestPki, *, vendor_id: int = TEST_VENDOR_ID
) -> tuple[Ledger, StationPaths]:
    paths = StationPaths(tmp_path)
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    profile = LotProfile(matter=MatterProfile(vendor_id=vendor_id, product_ids=(TEST_PRODUCT_ID,)))
    info = ledger.create_lot("m", customer="c", profile=profile, target_quantity=1, actor="test")
    store_bundle(paths, STATION_PASS, "m", parse_bundle(pki.pkcs12, UPLOAD_PASS, info))
    return ledger, paths


def _setup(ledger: Ledger, paths: StationPaths, pki: MatterTestPki, **overrides: bytes) -> None:
    files = {"paa": pki.paa_pem, "cd": pki.cd_der, "cd_signer": pki.cd_signer_pem, **overrides}
    setup_matter_lot(ledger, paths, STATION_PASS, "m", actor="test", **files)


def test_a_consistent_lot_is_stored_and_audited(tmp_path: Path) -> None:
    pki = make_matter_test_pki(passphrase=UPLOAD_PASS)
    ledger, paths = _lot(tmp_path, pki)
    with ledger:
        info = ledger.get_lot("m")
        assert any("PAA and Certification Declaration" in g for g in activation_gaps(
            info, ledger.progress("m"), paths.bundles, paths.firmware))  # fmt: skip
        _setup(ledger, paths, pki)
        assert MatterStore(paths.matter).has("m")
        assert not any("Certification" in g for g in activation_gaps(
            info, ledger.progress("m"), paths.bundles, paths.firmware))  # fmt: skip
        assert ledger.verify_audit() > 0


@pytest.mark.parametrize(
    ("pki_args", "lot_vid", "reason"),
    [
        ({"cd_vendor_id": 0xFFF2}, TEST_VENDOR_ID, "vendor_id 0xFFF2 is not the lot's VID 0xFFF1"),
        ({"pai_vendor_id": 0xFFF2}, TEST_VENDOR_ID, "PAI's VID 0xFFF2 is not the lot's 0xFFF1"),
        ({}, 0xFFF3, "PAI's VID 0xFFF1 is not the lot's 0xFFF3"),
    ],
)
def test_a_vid_mismatch_is_refused_whole(
    tmp_path: Path, pki_args: dict[str, int], lot_vid: int, reason: str
) -> None:
    pki = make_matter_test_pki(passphrase=UPLOAD_PASS, **pki_args)  # type: ignore[arg-type]
    ledger, paths = _lot(tmp_path, pki, vendor_id=lot_vid)
    with ledger, pytest.raises(MatterLotError, match=reason):
        _setup(ledger, paths, pki)
    assert not paths.matter.exists() or not any(paths.matter.iterdir())


def test_a_pai_that_is_not_a_ca_is_refused_at_the_bundle(tmp_path: Path) -> None:
    pki = make_matter_test_pki(passphrase=UPLOAD_PASS, pai_is_ca=False)
    with pytest.raises(BundleError, match="not a CA"):
        _lot(tmp_path, pki)


def test_a_pai_of_another_paa_or_a_malformed_cd_is_refused(tmp_path: Path) -> None:
    pki = make_matter_test_pki(passphrase=UPLOAD_PASS)
    other = make_matter_test_pki(passphrase=UPLOAD_PASS)
    ledger, paths = _lot(tmp_path, pki)
    with ledger:
        with pytest.raises(MatterLotError, match="does not chain to the PAA"):
            _setup(ledger, paths, pki, paa=other.paa_pem)
        with pytest.raises(InputError, match="CD"):
            _setup(ledger, paths, pki, cd=pki.cd_der[:-3])
        with pytest.raises(MatterLotError, match=r"signature|SKID"):
            _setup(ledger, paths, pki, cd_signer=other.cd_signer_pem)
        with pytest.raises(InputError, match="PAA"):
            _setup(ledger, paths, pki, paa=b"not a certificate")
    assert not MatterStore(paths.matter).has("m")


def test_a_non_matter_lot_cannot_be_set_up(tmp_path: Path) -> None:
    with Ledger.open(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        ledger.create_lot("plain", customer="c", profile=LotProfile(), target_quantity=1, actor="t")
        pki = make_matter_test_pki(passphrase=UPLOAD_PASS)
        with pytest.raises(InputError, match="not a Matter lot"):
            setup_matter_lot(
                ledger,
                StationPaths(tmp_path),
                STATION_PASS,
                "plain",
                paa=pki.paa_pem,
                cd=pki.cd_der,
                actor="t",
            )


def test_a_matter_lot_on_a_profile_without_matter_objects_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold Matter factory data"):
        LotProfile(protocol="arduino-v1", matter=MatterProfile(vendor_id=1, product_ids=(1,)))


def _customer(tmp_path: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "customer")])
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=9))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "customer.pem", tmp_path / "customer-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.mark.timeout(60)
def test_the_onboarding_file_decrypts_with_openssl_and_matches_the_ledger(tmp_path: Path) -> None:
    line = asyncio.run(make_line(tmp_path / "line", profile="matter", boards=2))
    hub = line.hub(ports=2, supply=2)
    asyncio.run(line.run(hub))
    cert_path, key_path = _customer(tmp_path)
    paths = StationPaths(line.settings.station.state_dir)
    with Ledger.open(line.settings.ledger_url) as ledger:
        export = export_onboarding_codes(
            ledger, paths, line.passphrase, LOT, recipient=cert_path.read_bytes(), actor="test"
        )
        expected = {
            d.device_id: ledger.onboarding_codes(LOT, d.device_id) for d in ledger.provisioned_devices(LOT)
        }
        serials = {d.device_id: d.hw_serial for d in ledger.provisioned_devices(LOT)}
    assert export.count == 2
    (tmp_path / "codes.p7m").write_bytes(export.der)
    done = openssl(
        "cms", "-decrypt", "-inform", "DER", "-in", str(tmp_path / "codes.p7m"),
        "-recip", str(cert_path), "-inkey", str(key_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout.decode())))
    assert {r["device_id"] for r in rows} == set(expected)
    for row in rows:
        assert OnboardingCodes(row["qr_payload"], row["manual_code"]) == expected[row["device_id"]]
        assert row["hw_serial"] == serials[row["device_id"]]
        assert (row["vendor_id"], row["product_id"]) == ("FFF1", "8000")
        assert int(row["discriminator"]) == parse_qr_payload(row["qr_payload"]).discriminator
    # The demo stored a recipient with the lot: the export works without one, too.
    with Ledger.open(line.settings.ledger_url) as ledger:
        assert export_onboarding_codes(ledger, paths, line.passphrase, LOT, actor="test").count == 2


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=lambda c: c.name)
def test_an_ec_customer_gets_key_agreement_and_openssl_decrypts(
    tmp_path: Path, curve: ec.EllipticCurve
) -> None:
    from factoryd.matter.onboarding import encrypt_onboarding

    key = ec.generate_private_key(curve)
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert = _self_signed(key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    plaintext = b"device_id,qr_payload\n" + b"d,MT:Y.K9042C00KA0648G00\n" * 50
    (tmp_path / "codes.p7m").write_bytes(encrypt_onboarding(plaintext, cert))
    done = openssl(
        "cms", "-decrypt", "-inform", "DER", "-in", str(tmp_path / "codes.p7m"),
        "-recip", str(cert_path), "-inkey", str(key_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == plaintext
    # Another key of the same curve cannot open it.
    key_path.write_bytes(
        ec.generate_private_key(curve).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    wrong = openssl(
        "cms", "-decrypt", "-inform", "DER", "-in", str(tmp_path / "codes.p7m"),
        "-recip", str(cert_path), "-inkey", str(key_path),
    )  # fmt: skip
    assert wrong.returncode != 0


def test_an_unusable_recipient_is_refused_with_the_reason() -> None:
    from factoryd.matter.onboarding import check_recipient

    with pytest.raises(InputError, match="secp256k1"):
        check_recipient(_self_signed(ec.generate_private_key(ec.SECP256K1())))
    with pytest.raises(InputError, match="1024 bits"):
        check_recipient(_self_signed(rsa.generate_private_key(public_exponent=65537, key_size=1024)))  # noqa: S505 - the weak key is the point


def _self_signed(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> x509.Certificate:
    import datetime as dt

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(123456789).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip


@pytest.mark.timeout(60)
def test_sealed_codes_need_the_station_secret(tmp_path: Path) -> None:
    line = asyncio.run(make_line(tmp_path, profile="matter", boards=1))
    asyncio.run(line.run(line.hub(ports=1, supply=1)))
    with Ledger.open(line.settings.ledger_url) as ledger:
        device = ledger.provisioned_devices(LOT)[0].device_id
        with pytest.raises(OnboardingSecretMissingError):
            ledger.onboarding_codes(LOT, device)
    with (
        Ledger.open(line.settings.ledger_url, onboarding_secret=b"another station") as ledger,
        pytest.raises(LedgerError, match="do not open"),
    ):
        ledger.onboarding_codes(LOT, device)
    with Ledger.open(line.settings.ledger_url, onboarding_secret=line.passphrase) as ledger:
        assert ledger.onboarding_codes(LOT, device) is not None
        with pytest.raises(InputError, match="not provisioned"):
            ledger.onboarding_codes(LOT, "00000000-0000-4000-8000-000000000000")
