"""The onboarding-codes download over the API: the lot's customer and the admin only, CMS for the customer."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from factoryd.ledger import LotProfile
from factoryd.matter.admin import setup_matter_lot
from factoryd.matter.onboarding import CSV_COLUMNS
from factoryd.matter.profile import MatterProfile
from factoryd.matter.testing import TEST_PRODUCT_ID, TEST_VENDOR_ID, make_matter_test_pki
from factoryd.service import parse_bundle, store_bundle
from tests.helpers.api import STATION_PASSPHRASE, TEST_BUNDLE_PASSPHRASE, running_api
from tests.helpers.openssl import openssl

MATTER_PROFILE = LotProfile(matter=MatterProfile(vendor_id=TEST_VENDOR_ID, product_ids=(TEST_PRODUCT_ID,)))


def _customer(tmp_path: Path) -> tuple[bytes, Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme onboarding")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(7).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=9)).sign(key, hashes.SHA256())
    )  # fmt: skip
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = tmp_path / "acme.pem", tmp_path / "acme-key.pem"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pem, cert_path, key_path


async def test_the_customer_downloads_the_onboarding_codes_others_cannot(tmp_path: Path) -> None:
    recipient, cert_path, key_path = _customer(tmp_path)
    async with running_api(tmp_path) as api:
        await api.make_lot("acme-matter", "acme", profile=MATTER_PROFILE)
        await api.make_lot("acme-plain", "acme")
        pki = await asyncio.to_thread(make_matter_test_pki, passphrase=TEST_BUNDLE_PASSPHRASE)
        lot = await api.ledger.get_lot("acme-matter")
        bundle = parse_bundle(pki.pkcs12, TEST_BUNDLE_PASSPHRASE, lot)
        store_bundle(api.ctx.paths, STATION_PASSPHRASE, "acme-matter", bundle)
        await asyncio.to_thread(
            setup_matter_lot,
            api.ledger.sync,
            api.ctx.paths,
            STATION_PASSPHRASE,
            "acme-matter",
            paa=pki.paa_pem,
            cd=pki.cd_der,
            recipient=recipient,
            actor="test",
        )
        async with api.client("acme") as acme:
            response = await acme.get("/lots/acme-matter/onboarding-codes.p7m")
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/pkcs7-mime"
            assert response.headers["x-devices"] == "0"
            not_matter = await acme.get("/lots/acme-plain/onboarding-codes.p7m")
            assert not_matter.status_code == 422
        for who, status in (("supervisor", 403), ("operator", 403), ("globex", 404)):
            async with api.client(who) as other:
                assert (await other.get("/lots/acme-matter/onboarding-codes.p7m")).status_code == status
    (tmp_path / "codes.p7m").write_bytes(response.content)
    done = openssl(
        "cms", "-decrypt", "-inform", "DER", "-in", str(tmp_path / "codes.p7m"),
        "-recip", str(cert_path), "-inkey", str(key_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == [",".join(CSV_COLUMNS)]
