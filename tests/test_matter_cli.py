"""`factoryd lots matter` and `lots onboarding-codes`: a refusal in one line, nothing stored; export."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from factoryd.cli.main import app
from factoryd.matter.testing import make_matter_test_pki
from tests.helpers.openssl import openssl

STATION_PASSPHRASE = "cli-station-passphrase"
BUNDLE_PASSPHRASE = "cli-bundle-passphrase"
ENV = {"FACTORYD_CA_PASSPHRASE": STATION_PASSPHRASE, "FACTORYD_BUNDLE_PASSPHRASE": BUNDLE_PASSPHRASE}


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=ENV)
    return result.exit_code, result.output


def test_a_matter_lot_is_set_up_from_the_cli_and_a_mismatch_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "factoryd.toml"
    config.write_text(f'[station]\nname = "cli-station"\nstate_dir = "{tmp_path}"\n')
    c = ("-c", str(config))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"matter": {"vendor_id": 0xFFF1, "product_ids": [0x8000]}}))
    good = make_matter_test_pki(passphrase=BUNDLE_PASSPHRASE.encode())
    wrong_cd = make_matter_test_pki(passphrase=BUNDLE_PASSPHRASE.encode(), cd_vendor_id=0xFFF2)
    (tmp_path / "pai.p12").write_bytes(good.pkcs12)
    (tmp_path / "paa.pem").write_bytes(good.paa_pem)
    (tmp_path / "cd.der").write_bytes(good.cd_der)
    (tmp_path / "wrong-cd.der").write_bytes(wrong_cd.cd_der)
    (tmp_path / "cd-signer.pem").write_bytes(good.cd_signer_pem)
    assert _run("lots", "create", "m1", "--customer", "acme", "--profile-file", str(profile), *c)[0] == 0
    code, output = _run("lots", "bundle", "m1", str(tmp_path / "pai.p12"), *c)
    assert code == 0, output
    # Wrong CD (its own signer, so only the VID is wrong): one line naming it, nothing stored.
    code, output = _run(
        "lots", "matter", "m1", "--paa", str(tmp_path / "paa.pem"), "--cd", str(tmp_path / "wrong-cd.der"), *c
    )
    assert code == 2
    assert "refused, nothing stored" in output
    assert "vendor_id 0xFFF2" in output
    assert not (tmp_path / "matter" / "m1").exists()
    code, output = _run(
        "lots", "matter", "m1", "--paa", str(tmp_path / "paa.pem"), "--cd", str(tmp_path / "cd.der"),
        "--cd-signer", str(tmp_path / "cd-signer.pem"), *c,
    )  # fmt: skip
    assert code == 0, output
    assert (tmp_path / "matter" / "m1" / "cd.der").read_bytes() == good.cd_der
    # No recipient stored and none given: a clear refusal, no file.
    out = tmp_path / "codes.p7m"
    code, output = _run("lots", "onboarding-codes", "m1", "-o", str(out), *c)
    assert code == 2
    assert "--recipient" in output
    assert not out.exists()
    # With the customer's certificate stored, the codes come with the manifest and on their own.
    recipient_cert, recipient_key = _customer(tmp_path)
    code, output = _run(
        "lots", "matter", "m1", "--paa", str(tmp_path / "paa.pem"), "--cd", str(tmp_path / "cd.der"),
        "--recipient", str(recipient_cert), *c,
    )  # fmt: skip
    assert code == 0, output
    code, output = _run("lots", "onboarding-codes", "m1", "-o", str(out), *c)
    assert code == 0, output
    code, output = _run("manifest", "export", "m1", "--out", str(tmp_path / "handover"), *c)
    assert code == 0, output
    for path in (out, tmp_path / "handover" / "m1.onboarding-codes.p7m"):
        done = openssl(
            "cms", "-decrypt", "-inform", "DER", "-in", str(path), "-recip", str(recipient_cert),
            "-inkey", str(recipient_key),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(b"device_id,hw_serial,")


def _customer(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(5).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "acme.pem", tmp_path / "acme-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path
