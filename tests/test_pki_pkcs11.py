"""PKCS#11 signer on SoftHSM2: import a lot CA key, issue and verify, non-extractable key, PIN handling."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from factoryd.errors import ConfigError, SignerError
from factoryd.jobs.lots import load_lot_context
from factoryd.ledger.model import LotInfo, LotState, ProvisionedDevice
from factoryd.ledger.profile import LotProfile
from factoryd.pki import pkcs11 as p11
from factoryd.pki.bundle import CaBundle, chain_pem, load_pkcs12_bundle
from factoryd.pki.issuer import IssuedCertificate, Issuer
from factoryd.pki.keyimport import import_key_to_token
from factoryd.pki.manifest import build_manifest, verify_manifest
from factoryd.pki.passphrase import Secret
from factoryd.pki.pkcs11 import (
    REFERENCE_FILE,
    Pkcs11Signer,
    TokenReference,
    load_pkcs11_pin,
    open_token_lot,
    reload_module,
)
from factoryd.pki.profile import CertProfile
from factoryd.pki.signer import CaPrivateKey
from factoryd.pki.store import KEY_FILE, BundleStore
from factoryd.pki.testca import make_ca_cert, make_test_pki

SOFTHSM_UTIL = shutil.which("softhsm2-util")
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
OPENSSL = shutil.which("openssl")
TOKEN = "factoryd-ca"
# Never logged in with the right PIN in this process, so the module itself checks a wrong one.
LOCKED_TOKEN = "factoryd-untouched"
PIN = Secret(b"314159-user")
WRONG_PIN = Secret(b"271828-wrong")
SO_PIN = "so-pin-1234"
STATION_PASSPHRASE = b"station-passphrase"


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private SoftHSM2 token directory with two initialised tokens; yields the module path."""
    if SOFTHSM_UTIL is None or not Path(MODULE).is_file():
        pytest.fail(
            "SoftHSM2 is not installed (softhsm2-util or /usr/lib/softhsm/libsofthsm2.so missing): "
            "apt-get install -y softhsm2"
        )
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        for label in (TOKEN, LOCKED_TOKEN):
            subprocess.run(  # noqa: S603 - fixed argv
                [
                    SOFTHSM_UTIL,
                    "--init-token",
                    "--free",
                    "--label",
                    label,
                    "--pin",
                    PIN.decode(),
                    "--so-pin",
                    SO_PIN,
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
        reload_module(MODULE)  # the module reads SOFTHSM2_CONF (and finds tokens) in C_Initialize only
        yield MODULE
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
        reload_module(MODULE)


@dataclass
class TokenCa:
    bundle: CaBundle
    root: x509.Certificate
    lot_dir: Path
    signer: Pkcs11Signer


def _ca_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _bundle(kind: str) -> CaBundle:
    """A root (P-256) and an issuing CA whose key is ``kind``."""
    if kind == "p256":
        pki = make_test_pki(passphrase=b"pkcs12-pass")
        return load_pkcs12_bundle(pki.pkcs12, pki.passphrase)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    root_key = ec.generate_private_key(ec.SECP256R1())
    key: CaPrivateKey = (
        ec.generate_private_key(ec.SECP384R1()) if kind == "p384" else rsa.generate_private_key(65537, 2048)
    )
    start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=15 * 366)
    root = make_ca_cert(_ca_name(f"{kind} root"), root_key, serial=1, not_before=start, not_after=end)
    issuing = make_ca_cert(
        _ca_name(f"{kind} issuing"),
        key,
        issuer=root,
        issuer_key=root_key,
        serial=2,
        not_before=start,
        not_after=end,
        path_length=0,
    )
    return CaBundle(issuing, key, (issuing, root), ())


def _import(module: str, tmp_path: Path, kind: str, label: str) -> TokenCa:
    bundle = _bundle(kind)
    store = BundleStore(tmp_path / "bundles", STATION_PASSPHRASE)
    lot_dir = store.save(label, bundle)
    import_key_to_token(bundle, module, TOKEN, PIN, label, lot_dir=lot_dir)
    token_lot = open_token_lot(lot_dir, pin=PIN)
    assert token_lot is not None
    return TokenCa(bundle, bundle.root, lot_dir, token_lot.signer)


@pytest.fixture(scope="module")
def p256_ca(softhsm: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenCa]:
    ca = _import(softhsm, tmp_path_factory.mktemp("p256"), "p256", "lot-p256")
    yield ca
    ca.signer.close()


def _csr(device_id: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER), key


def _issue(issuer: Issuer, device_id: str) -> IssuedCertificate:
    csr_der, _ = _csr(device_id)
    return issuer.issue(issuer.verify_csr(csr_der, device_id), device_id)


def _openssl_verify(tmp_path: Path, ca: TokenCa, issued: IssuedCertificate) -> None:
    assert OPENSSL is not None, "openssl is required"
    (tmp_path / "root.pem").write_bytes(ca.root.public_bytes(serialization.Encoding.PEM))
    issuing = ca.bundle.certificate.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "issuing.pem").write_bytes(issuing)
    (tmp_path / "device.pem").write_text(issued.pem)
    result = subprocess.run(  # noqa: S603 - fixed argv
        [OPENSSL, "verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "issuing.pem", "device.pem"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device.pem: OK" in result.stdout


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa2048"])
def test_issue_through_token_verifies(softhsm: str, tmp_path: Path, kind: str) -> None:
    ca = _import(softhsm, tmp_path, kind, f"lot-issue-{kind}")
    with ca.signer:
        issuer = Issuer(ca.signer, ca.bundle.chain, CertProfile())
        for index in range(3):
            device_id = f"dev-{kind}-{index}"
            issued = _issue(issuer, device_id)
            issued.cert.verify_directly_issued_by(ca.bundle.certificate)
            assert issued.cert.subject.rfc4514_string() == f"CN={device_id}"
            expected_hash = hashes.SHA384 if kind == "p384" else hashes.SHA256
            assert isinstance(issued.cert.signature_hash_algorithm, expected_hash)
            _openssl_verify(tmp_path, ca, issued)


def test_import_removes_software_key_and_writes_reference(p256_ca: TokenCa) -> None:
    assert not (p256_ca.lot_dir / KEY_FILE).exists()
    reference_path = p256_ca.lot_dir / REFERENCE_FILE
    assert reference_path.stat().st_mode & 0o777 == 0o600
    text = reference_path.read_text()
    assert PIN.decode() not in text
    reference = TokenReference.parse(text.encode())
    assert (reference.module_path, reference.token_label, reference.key_label) == (MODULE, TOKEN, "lot-p256")


def test_token_signer_says_it_blocks(p256_ca: TokenCa) -> None:
    # The pipeline runs a blocking signer in a thread; the in-memory one stays on the loop.
    assert p256_ca.signer.blocking is True
    assert p256_ca.bundle.signer().blocking is False


def test_key_is_not_extractable(p256_ca: TokenCa) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    flags = p256_ca.signer.key_attributes()
    assert flags["sensitive"] is True
    assert flags["extractable"] is False
    # The signer keeps the token logged in: a second session sees the private key, but not its value.
    session = p11._library(MODULE).get_token(token_label=TOKEN).open()
    try:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="lot-p256")
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
    finally:
        session.close()


def test_wrong_pin_is_refused_without_showing_it(softhsm: str, p256_ca: TokenCa) -> None:
    with pytest.raises(SignerError, match="wrong PIN") as first_contact:
        Pkcs11Signer(softhsm, LOCKED_TOKEN, "any", WRONG_PIN, p256_ca.bundle.certificate)
    # Already logged in by this process: the PIN is checked against the one used at login.
    with pytest.raises(SignerError, match="wrong PIN") as logged_in:
        Pkcs11Signer(softhsm, TOKEN, "lot-p256", WRONG_PIN, p256_ca.bundle.certificate)
    for error in (first_contact.value, logged_in.value):
        assert WRONG_PIN.decode() not in str(error)
        assert WRONG_PIN.decode() not in repr(error.__cause__)
    # A refused PIN leaves the working signer usable.
    assert p256_ca.signer.sign_bytes(b"still works")


def test_manifest_signed_on_token_verifies(p256_ca: TokenCa) -> None:
    issuer = Issuer(p256_ca.signer, p256_ca.bundle.chain, CertProfile())
    issued = _issue(issuer, "manifest-dev-1")
    record = ProvisionedDevice(
        device_id="manifest-dev-1",
        lot="lot-p256",
        hw_serial="0123aa",
        cert_der=issued.der,
        cert_serial=issued.serial_hex,
        fingerprint_sha256=issued.fingerprint_sha256,
        provisioned_at=dt.datetime.now(dt.UTC),
        station="st1",
        port="1",
        metadata={},
    )
    manifest = build_manifest("lot-p256", [record], p256_ca.signer, p256_ca.bundle.chain)
    document = verify_manifest(manifest.json_bytes, manifest.signature_der, [p256_ca.root])
    assert document["devices"][0]["device_id"] == "manifest-dev-1"


def test_load_lot_context_uses_the_token(
    p256_ca: TokenCa, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("FACTORYD_PKCS11_PIN", PIN.decode())
    store = BundleStore(p256_ca.lot_dir.parent, STATION_PASSPHRASE)
    info = LotInfo("lot-p256", "customer", LotState.ACTIVE, LotProfile(), None, dt.datetime.now(dt.UTC))
    context = load_lot_context(info, store, tmp_path / "firmware")
    assert context.chain_pem == chain_pem(p256_ca.bundle)
    issued = _issue(context.issuer, "ctx-dev-1")
    issued.cert.verify_directly_issued_by(p256_ca.bundle.certificate)


def test_concurrent_issuing_shares_one_session(p256_ca: TokenCa) -> None:
    issuer = Issuer(p256_ca.signer, p256_ca.bundle.chain, CertProfile())
    results: list[IssuedCertificate] = []
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for index in range(5):
                results.append(_issue(issuer, f"thr-{worker}-{index}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(results) == 20
    for issued in results:
        issued.cert.verify_directly_issued_by(p256_ca.bundle.certificate)


def test_signature_that_does_not_verify_is_refused(p256_ca: TokenCa, monkeypatch: pytest.MonkeyPatch) -> None:
    signer = p256_ca.signer
    real_sign = signer._sign
    monkeypatch.setattr(signer, "_sign", lambda data: real_sign(data + b"tampered"))
    issuer = Issuer(signer, p256_ca.bundle.chain, CertProfile())
    with pytest.raises(SignerError, match="does not verify"):
        _issue(issuer, "bad-sig-dev")
    with pytest.raises(SignerError, match="does not verify"):
        signer.sign_bytes(b"data")


def test_key_must_match_certificate(softhsm: str, p256_ca: TokenCa) -> None:
    other = _bundle("p256").certificate
    with pytest.raises(SignerError, match="does not match the CA certificate"):
        Pkcs11Signer(softhsm, TOKEN, "lot-p256", PIN, other)
    with pytest.raises(SignerError, match="is EC, but the CA certificate holds an RSA key"):
        Pkcs11Signer(softhsm, TOKEN, "lot-p256", PIN, _bundle("rsa2048").certificate)
    with pytest.raises(SignerError, match="no private key labelled 'missing'"):
        Pkcs11Signer(softhsm, TOKEN, "missing", PIN, other)


def test_import_refuses_existing_label_and_changes_nothing(
    softhsm: str, p256_ca: TokenCa, tmp_path: Path
) -> None:
    bundle = _bundle("p256")
    lot_dir = BundleStore(tmp_path, STATION_PASSPHRASE).save("lot-dup", bundle)
    with pytest.raises(SignerError, match="already holds an object with label 'lot-p256'"):
        import_key_to_token(bundle, softhsm, TOKEN, PIN, "lot-p256", lot_dir=lot_dir)
    assert (lot_dir / KEY_FILE).exists()
    assert not (lot_dir / REFERENCE_FILE).exists()
    # The original key is untouched and still the only one with that label.
    assert p256_ca.signer.sign_bytes(b"unchanged")


def test_import_can_keep_the_software_key_and_logs_no_pin(softhsm: str, tmp_path: Path) -> None:
    bundle = _bundle("p256")
    store = BundleStore(tmp_path, STATION_PASSPHRASE)
    lot_dir = store.save("lot-keep", bundle)
    with capture_logs() as logs:
        import_key_to_token(
            bundle, softhsm, TOKEN, PIN, "lot-keep", lot_dir=lot_dir, remove_software_key=False
        )
    assert (lot_dir / KEY_FILE).exists()
    assert store.load("lot-keep").certificate == bundle.certificate
    assert [entry["event"] for entry in logs] == ["ca_key_imported_to_token"]
    assert PIN.decode() not in repr(logs)
    with pytest.raises(SignerError, match="already in a token"):
        import_key_to_token(bundle, softhsm, TOKEN, PIN, "lot-keep-2", lot_dir=lot_dir)


def test_reference_file_is_checked(tmp_path: Path, p256_ca: TokenCa) -> None:
    good = (p256_ca.lot_dir / REFERENCE_FILE).read_bytes()
    with pytest.raises(SignerError, match="must not hold a PIN") as error:
        TokenReference.parse(good.replace(b'"version"', b'"pin": "999111", "version"'))
    assert "999111" not in str(error.value)
    with pytest.raises(SignerError, match=r"missing fields \['key_label'\]"):
        TokenReference.parse(good.replace(b'"key_label"', b'"key_labl"'))
    with pytest.raises(SignerError, match="module_path must be an absolute path"):
        TokenReference.parse(good.replace(MODULE.encode(), b"libsofthsm2.so"))
    with pytest.raises(SignerError, match="not JSON"):
        TokenReference.parse(b"{")
    # A reference that names another CA than the chain next to it is refused.
    lot_dir = tmp_path / "lot"
    shutil.copytree(p256_ca.lot_dir, lot_dir)
    (lot_dir / REFERENCE_FILE).write_bytes(good.replace(good.split(b'"ca_sha256": "')[1][:64], b"0" * 64))
    with pytest.raises(SignerError, match="ca_sha256 does not match"):
        open_token_lot(lot_dir, pin=PIN)
    assert open_token_lot(tmp_path / "no-such-lot", pin=PIN) is None


def test_pin_comes_from_credential_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACTORYD_PKCS11_PIN", raising=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError, match="factoryd-pkcs11-pin"):
        load_pkcs11_pin()
    monkeypatch.setenv("FACTORYD_PKCS11_PIN", "from-env")
    assert load_pkcs11_pin() == b"from-env"
    (tmp_path / "factoryd-pkcs11-pin").write_bytes(b"from-credential\n")
    pin = load_pkcs11_pin()
    assert pin == b"from-credential"
    assert "from-credential" not in repr(pin)


def test_closed_signer_refuses(softhsm: str, p256_ca: TokenCa) -> None:
    signer = Pkcs11Signer(softhsm, TOKEN, "lot-p256", PIN, p256_ca.bundle.certificate)
    signer.close()
    with pytest.raises(SignerError, match="is closed"):
        signer.sign_bytes(b"x")
    # Other signers on the same token keep their session.
    assert p256_ca.signer.sign_bytes(b"y")
