"""CA proof of possession: a verification certificate (CN=code) signed by the lot's CA key or token."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from factoryd.cli.main import app
from factoryd.errors import InputError
from factoryd.ledger import Ledger, LotProfile
from factoryd.pki import load_pkcs12_bundle
from factoryd.pki.pkcs11 import REFERENCE_FILE
from factoryd.pki.store import KEY_FILE
from factoryd.pki.testca import TestPki, make_test_pki
from factoryd.pki.verification import (
    VERIFICATION_VALIDITY_S,
    check_verification_code,
    verification_certificate,
)
from factoryd.service import StationPaths, ca_verification, store_bundle

OPENSSL = shutil.which("openssl")
SOFTHSM_UTIL = shutil.which("softhsm2-util")
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PASSPHRASE = b"verification-test"
STATION_PASSPHRASE = "station-pass"
AWS_CODE = "a1b2c3d4" * 8  # GetRegistrationCode: 64 hex digits
LOT = "acme-pop"
runner = CliRunner()


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=PASSPHRASE)


def _openssl_verify(tmp_path: Path, pki: TestPki, cert_pem: bytes) -> None:
    assert OPENSSL is not None, "openssl is required"
    (tmp_path / "root.pem").write_bytes(pki.root_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "issuing.pem").write_bytes(pki.issuing_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "verification.pem").write_bytes(cert_pem)
    result = subprocess.run(  # noqa: S603 - fixed argv
        [
            OPENSSL,
            "verify",
            "-x509_strict",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "issuing.pem",
            "verification.pem",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_verification_certificate_names_the_code_and_verifies(pki: TestPki, tmp_path: Path) -> None:
    signer = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE).signer()
    verification = verification_certificate(signer, AWS_CODE)
    cert = verification.cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == AWS_CODE
    assert cert.issuer == pki.issuing_cert.subject
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= VERIFICATION_VALIDITY_S + 300
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    _openssl_verify(tmp_path, pki, verification.pem.encode())


@pytest.mark.parametrize("code", ["", "x" * 65, "has space", "semi;colon", "ünïcode", "a/b"])
def test_bad_codes_are_refused(code: str) -> None:
    with pytest.raises(InputError, match="verification code"):
        check_verification_code(code)


@pytest.mark.parametrize("code", [AWS_CODE, "0123ABCDEF", "Zm9v.YmFy_-1"])
def test_cloud_codes_are_accepted(code: str) -> None:
    assert check_verification_code(code) == code


def _station(pki: TestPki, tmp_path: Path) -> tuple[Ledger, StationPaths]:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    paths = StationPaths(tmp_path / "state")
    store_bundle(paths, STATION_PASSPHRASE.encode(), LOT, load_pkcs12_bundle(pki.pkcs12, PASSPHRASE))
    ledger.create_lot(LOT, customer="acme", profile=LotProfile(), target_quantity=None, actor="test")
    return ledger, paths


def _audited(tmp_path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = db.execute(
            "SELECT subject, details FROM audit_entry WHERE action = 'lot.ca_verification' ORDER BY seq"
        ).fetchall()
    return [(str(subject), str(details)) for subject, details in rows]


def test_service_audits_the_code_and_serial(pki: TestPki, tmp_path: Path) -> None:
    ledger, paths = _station(pki, tmp_path)
    with ledger:
        verification = ca_verification(
            ledger, paths, STATION_PASSPHRASE.encode(), LOT, AWS_CODE, actor="admin"
        )
        with pytest.raises(InputError):
            ca_verification(ledger, paths, STATION_PASSPHRASE.encode(), LOT, "bad code", actor="admin")
        assert ledger.verify_audit() > 0
    ((subject, details),) = _audited(tmp_path)
    assert subject == LOT
    assert AWS_CODE in details
    assert verification.serial_hex in details


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FACTORYD_CA_PASSPHRASE": STATION_PASSPHRASE,
        "FACTORYD_BUNDLE_PASSPHRASE": PASSPHRASE.decode(),
        **extra,
    }


def test_cli_prints_the_certificate(pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nname = "st"\nstate_dir = "{tmp_path}"\n')
    (tmp_path / "ca.p12").write_bytes(pki.pkcs12)
    for name, value in _env(tmp_path).items():
        monkeypatch.setenv(name, value)
    for args in (
        ["lots", "create", LOT, "--customer", "acme"],
        ["lots", "bundle", LOT, str(tmp_path / "ca.p12")],
    ):
        result = runner.invoke(app, [*args, "-c", str(config)])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["lots", "ca-verification", LOT, "--code", AWS_CODE, "-c", str(config)])
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate(result.stdout.encode())
    assert cert.subject.rfc4514_string() == f"CN={AWS_CODE}"
    result = runner.invoke(app, ["lots", "ca-verification", LOT, "--code", "no spaces", "-c", str(config)])
    assert result.exit_code == 2
    assert "verification code" in result.output


def _cli(tmp_path: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "factoryd", *args, "-c", str(tmp_path / "factoryd.toml")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_token_signed_verification_certificate_and_crl(pki: TestPki, tmp_path: Path) -> None:
    # A separate process: the PKCS#11 module reads SOFTHSM2_CONF once per process, and
    # tests/test_pki_pkcs11.py owns this process's token directory.
    if SOFTHSM_UTIL is None or not Path(MODULE).is_file():
        pytest.fail("SoftHSM2 is not installed (softhsm2-util, /usr/lib/softhsm/libsofthsm2.so)")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    pin = "2718-user"
    env = _env(tmp_path, SOFTHSM2_CONF=str(conf), FACTORYD_PKCS11_PIN=pin)
    subprocess.run(  # noqa: S603 - fixed argv
        [SOFTHSM_UTIL, "--init-token", "--free", "--label", "pop", "--pin", pin, "--so-pin", "so-1234"],
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    )
    (tmp_path / "factoryd.toml").write_text(f'[station]\nname = "st"\nstate_dir = "{tmp_path / "state"}"\n')
    (tmp_path / "ca.p12").write_bytes(pki.pkcs12)
    lot = f"tok-{uuid.uuid4().hex[:8]}"
    _cli(tmp_path, env, "lots", "create", lot, "--customer", "acme")
    _cli(tmp_path, env, "lots", "bundle", lot, str(tmp_path / "ca.p12"))
    _cli(tmp_path, env, "lots", "key-to-token", lot, "--module", MODULE, "--token", "pop", "--key-label", lot)
    lot_dir = tmp_path / "state" / "bundles" / lot
    assert (lot_dir / REFERENCE_FILE).is_file()
    assert not (lot_dir / KEY_FILE).exists()
    out = _cli(
        tmp_path, env, "lots", "ca-verification", lot, "--code", AWS_CODE, "--out", str(tmp_path / "v.pem")
    )
    assert "CN=" + AWS_CODE in out
    _openssl_verify(tmp_path, pki, (tmp_path / "v.pem").read_bytes())
    _cli(tmp_path, env, "manifest", "crl", lot, "--out", str(tmp_path / "lot.crl.pem"))
    crl = x509.load_pem_x509_crl((tmp_path / "lot.crl.pem").read_bytes())
    assert crl.is_signature_valid(pki.issuing_cert.public_key())
    assert OPENSSL is not None
    result = subprocess.run(  # noqa: S603 - fixed argv
        [OPENSSL, "crl", "-in", "lot.crl.pem", "-CAfile", "issuing.pem", "-noout"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert "verify OK" in result.stdout + result.stderr, result.stdout + result.stderr


async def test_api_gives_the_customer_and_admin_a_verification_certificate(tmp_path: Path) -> None:
    from tests.helpers.api import running_api

    async with running_api(tmp_path) as api:
        await api.make_lot("acme-api", "acme")
        path = f"/lots/acme-api/ca-verification?code={AWS_CODE}"
        async with api.client("acme") as acme:
            early = await acme.post(path)
            assert early.status_code == 409
            assert "no CA bundle" in early.json()["detail"]
        await api.make_provisionable("acme-api")
        for who in ("acme", "admin"):
            async with api.client(who) as client:
                reply = await client.post(path)
                assert reply.status_code == 200, reply.text
                assert reply.headers["content-type"].startswith("application/x-pem-file")
                cert = x509.load_pem_x509_certificate(reply.content)
                assert cert.subject.rfc4514_string() == f"CN={AWS_CODE}"
        for who, status in (("operator", 403), ("supervisor", 403), ("globex", 404)):
            async with api.client(who) as client:
                assert (await client.post(path)).status_code == status, who
        async with api.client("admin") as admin:
            refused = await admin.post("/lots/acme-api/ca-verification?code=not%20ok")
            assert refused.status_code in (400, 422)
            assert "verification code" in refused.text
