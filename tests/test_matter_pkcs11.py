"""A Matter lot whose PAI key lives in a PKCS#11 token (SoftHSM2): set-up and DACs through the token.

The PAI key is imported into the token and removed from disk (pki/keyimport.py, as `factoryd lots
pkcs11-import` does); the lot set-up check opens the lot through its token reference, and the DACs it
signs pass the independent profile check and openssl verify with the PAA.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factoryd.jobs.lots import cert_profile
from factoryd.ledger import Ledger, LotProfile
from factoryd.matter.admin import setup_matter_lot
from factoryd.matter.dac import chain_problems
from factoryd.matter.lot import MatterStore
from factoryd.matter.profile import MatterProfile
from factoryd.matter.testing import TEST_PRODUCT_ID, TEST_VENDOR_ID, make_matter_test_pki
from factoryd.pki.bundle import load_pkcs12_bundle
from factoryd.pki.issuer import Issuer
from factoryd.pki.keyimport import import_key_to_token
from factoryd.pki.passphrase import Secret
from factoryd.pki.pkcs11 import DEFAULT_PIN_ENV, open_token_lot, reload_module
from factoryd.pki.store import KEY_FILE, BundleStore
from factoryd.service import StationPaths
from tests.helpers.openssl import openssl

SOFTHSM_UTIL = shutil.which("softhsm2-util")
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN = "factoryd-matter"
PIN = Secret(b"5678-user-pin")
STATION_PASSPHRASE = b"station-passphrase"
UPLOAD = b"upload"
LOT = "matter-token"


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private SoftHSM2 token; yields the module path."""
    if SOFTHSM_UTIL is None or not Path(MODULE).is_file():
        pytest.fail("SoftHSM2 is not installed: apt-get install -y softhsm2")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    monkeypatch.setenv(DEFAULT_PIN_ENV, PIN.decode())
    subprocess.run(  # noqa: S603 - fixed argv
        [
            SOFTHSM_UTIL,
            "--init-token",
            "--free",
            "--label",
            TOKEN,
            "--pin",
            PIN.decode(),
            "--so-pin",
            "so-1234",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    reload_module(MODULE)  # the module reads SOFTHSM2_CONF (and finds tokens) in C_Initialize only
    return MODULE


def test_a_token_pai_sets_up_the_lot_and_signs_dacs(softhsm: str, tmp_path: Path) -> None:
    pki = make_matter_test_pki(passphrase=UPLOAD)
    paths = StationPaths(tmp_path / "state")
    profile = LotProfile(matter=MatterProfile(vendor_id=TEST_VENDOR_ID, product_ids=(TEST_PRODUCT_ID,)))
    bundle = load_pkcs12_bundle(pki.pkcs12, UPLOAD, profile=cert_profile(profile))
    lot_dir = BundleStore(paths.bundles, STATION_PASSPHRASE).save(LOT, bundle)
    import_key_to_token(bundle, softhsm, TOKEN, PIN, LOT, lot_dir=lot_dir)
    assert not (lot_dir / KEY_FILE).exists()  # the PAI key is only in the token now
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        ledger.create_lot(LOT, customer="c", profile=profile, target_quantity=1, actor="t")
        setup_matter_lot(ledger, paths, STATION_PASSPHRASE, LOT, paa=pki.paa_pem, cd=pki.cd_der, actor="t")
    assert MatterStore(paths.matter).has(LOT)
    token_lot = open_token_lot(lot_dir, pin=PIN)
    assert token_lot is not None
    try:
        issuer = Issuer(token_lot.signer, token_lot.chain, cert_profile(profile))
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-token-1")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        issued = issuer.issue(csr, "dev-token-1")
    finally:
        token_lot.signer.close()
    assert chain_problems(issued.cert, pki.pai, pki.paa) == []
    (tmp_path / "paa.pem").write_bytes(pki.paa_pem)
    (tmp_path / "pai.pem").write_bytes(pki.pai.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "dac.pem").write_bytes(issued.pem.encode())
    done = openssl(
        "verify", "-x509_strict", "-CAfile", str(tmp_path / "paa.pem"),
        "-untrusted", str(tmp_path / "pai.pem"), str(tmp_path / "dac.pem"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
