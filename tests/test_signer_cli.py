"""`factoryd signer` line CA commands, judged by openssl: station and signer certificates, revocation."""

from __future__ import annotations

import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from factoryd.cli.main import app

OPENSSL = shutil.which("openssl")
PASSPHRASE = "signer-cli-passphrase"


@dataclass(frozen=True)
class _Result:
    returncode: int
    stdout: str
    stderr: str


def _cli(*args: str) -> _Result:
    """`factoryd signer ARGS` in this process (the CLI's own parser and error handling)."""
    out = CliRunner().invoke(app, ["signer", *args], env={"FACTORYD_CA_PASSPHRASE": PASSPHRASE})
    return _Result(out.exit_code, out.stdout, out.stderr)


def _openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None, "openssl is required"
    return subprocess.run(  # noqa: S603 - fixed tool
        [OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def test_line_ca_station_and_signer_certificates_verify_with_openssl(tmp_path: Path) -> None:
    config = tmp_path / "signer.toml"
    config.write_text(f'[station]\nname = "signer-1"\nstate_dir = "{tmp_path / "state"}"\n')
    made = _cli("init-line-ca", "--name", "ACME line A", "-c", str(config))
    assert made.returncode == 0, made.stderr
    ca_dir = tmp_path / "state" / "signer" / "line-ca"
    ca = ca_dir / "line-ca.pem"
    assert stat.S_IMODE((ca_dir / "line-ca-key.pem").stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in (ca_dir / "line-ca-key.pem").read_bytes()
    again = _cli("init-line-ca", "-c", str(config))
    assert again.returncode == 2
    assert "never overwritten" in again.stderr

    station = _cli("issue-station-cert", "station-07", "--out", str(tmp_path / "st"), "-c", str(config))
    assert station.returncode == 0, station.stderr
    cert_path, key_path = tmp_path / "st" / "station-07.pem", tmp_path / "st" / "station-07-key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "station-07"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verified = _openssl("verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", ca, cert_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # The key is the certificate's (openssl compares the public keys).
    pub_cert = _openssl("x509", "-in", cert_path, "-noout", "-pubkey").stdout
    pub_key = _openssl("pkey", "-in", key_path, "-pubout").stdout
    assert pub_cert
    assert pub_cert == pub_key
    twice = _cli("issue-station-cert", "station-07", "--out", str(tmp_path / "st"), "-c", str(config))
    assert twice.returncode == 2
    assert "never overwritten" in twice.stderr

    server = _cli(
        "issue-signer-cert",
        "--name",
        "signer.line-a.lan",
        "--name",
        "10.1.0.5",
        "--out",
        str(tmp_path / "tls"),
        "-c",
        str(config),
    )
    assert server.returncode == 0, server.stderr
    server_cert = tmp_path / "tls" / "signer.pem"
    checked = _openssl(
        "verify", "-x509_strict", "-purpose", "sslserver", "-verify_hostname", "signer.line-a.lan",
        "-CAfile", ca, server_cert,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    by_ip = _openssl("verify", "-purpose", "sslserver", "-verify_ip", "10.1.0.5", "-CAfile", ca, server_cert)
    assert by_ip.returncode == 0, by_ip.stdout + by_ip.stderr
    # A station certificate is no server certificate.
    wrong = _openssl("verify", "-purpose", "sslserver", "-CAfile", ca, cert_path)
    assert wrong.returncode != 0

    revoked = _cli("revoke-station", str(cert_path), "-c", str(config))
    assert revoked.returncode == 0, revoked.stderr
    crl = ca_dir / "line-ca.crl"
    refused = _openssl("verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl, cert_path)
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr


def test_a_station_name_with_whitespace_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "signer.toml"
    config.write_text(f'[station]\nname = "signer-1"\nstate_dir = "{tmp_path / "state"}"\n')
    assert _cli("init-line-ca", "-c", str(config)).returncode == 0
    bad = _cli("issue-station-cert", "station 7", "-c", str(config))
    assert bad.returncode == 2
    assert "whitespace" in bad.stderr
    assert not (tmp_path / "state" / "signer" / "stations").exists() or not any(
        (tmp_path / "state" / "signer" / "stations").iterdir()
    )


def test_certificates_need_a_line_ca(tmp_path: Path) -> None:
    config = tmp_path / "signer.toml"
    config.write_text(f'[station]\nname = "signer-1"\nstate_dir = "{tmp_path / "state"}"\n')
    result = _cli("issue-station-cert", "station-1", "-c", str(config))
    assert result.returncode == 2
    assert "init-line-ca" in result.stderr
