"""The line CA: who may talk to the signer. It issues each station's client certificate and the signer's
server certificate, and revokes stations (a CRL the signer checks on every handshake).

Files under the line CA directory (``<signer state_dir>/signer/line-ca/`` by default), all 0600:
``line-ca.pem`` (the certificate every station pins as the signer's CA and the signer trusts for
clients), ``line-ca-key.pem`` (PKCS#8, encrypted under the signer's passphrase) and ``line-ca.crl``
(revoked station certificates; always present, so the handshake check never lacks it).
The station's name is the client certificate's CN: the signer compares it with the ledger's
reservations, so a station cannot speak for another.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factoryd.errors import ConfigError, InputError, SignerError
from factoryd.files import write_private
from factoryd.ledger.engine import require_label
from factoryd.pki.issuer import SIGNING_KEY_USAGE, random_serial
from factoryd.pki.testca import ca_key_usage

LINE_CA_CERT = "line-ca.pem"
LINE_CA_KEY = "line-ca-key.pem"
LINE_CA_CRL = "line-ca.crl"
LINE_CA_VALIDITY_DAYS = 10 * 365
# Station and signer certificates are renewed with the line PCs (a few years); the CRL is re-signed
# on every revocation and at least this often by `factoryd signer revoke-station --refresh`.
ENDPOINT_VALIDITY_DAYS = 3 * 365
CRL_VALIDITY_DAYS = 365
# Clock skew between the line PCs that a fresh certificate must tolerate.
BACKDATE = dt.timedelta(minutes=5)
STATION_OU = "factoryd station"
SIGNER_OU = "factoryd signer"


@dataclass(frozen=True)
class LineCa:
    """The line CA's certificate and key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    directory: Path

    @property
    def cert_path(self) -> Path:
        """The CA certificate file (the signer's client CA, the stations' signer CA)."""
        return self.directory / LINE_CA_CERT

    @property
    def crl_path(self) -> Path:
        """The CRL file."""
        return self.directory / LINE_CA_CRL


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def init_line_ca(directory: Path, passphrase: bytes, *, name: str, now: dt.datetime | None = None) -> LineCa:
    """Create the line CA (refuses to overwrite one); returns it."""
    if (directory / LINE_CA_KEY).exists() or (directory / LINE_CA_CERT).exists():
        raise ConfigError(f"a line CA already exists in {directory}; it is never overwritten")
    require_label(name, "line CA name")
    when = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(when - BACKDATE)
        .not_valid_after(when + dt.timedelta(days=LINE_CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_key_usage(digital_signature=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    encryption = serialization.BestAvailableEncryption(passphrase)
    write_private(
        directory / LINE_CA_KEY,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption),
        replace=False,
    )
    write_private(directory / LINE_CA_CERT, cert.public_bytes(serialization.Encoding.PEM), replace=False)
    ca = LineCa(cert, key, directory)
    _write_crl(ca, [], when)
    return ca


def load_line_ca(directory: Path, passphrase: bytes) -> LineCa:
    """Open the line CA; SignerError on a wrong passphrase, ConfigError when there is none."""
    try:
        cert = x509.load_pem_x509_certificate((directory / LINE_CA_CERT).read_bytes())
        key_pem = (directory / LINE_CA_KEY).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no line CA in {directory} (create it: factoryd signer init-line-ca)") from None
    try:
        key = serialization.load_pem_private_key(key_pem, passphrase)
    except (ValueError, TypeError):
        raise SignerError(f"the line CA key in {directory} does not open with this passphrase") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignerError("the line CA key is not an EC key")
    return LineCa(cert, key, directory)


def _endpoint_cert(
    ca: LineCa,
    *,
    common_name: str,
    unit: str,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(
            min(now + dt.timedelta(days=ENDPOINT_VALIDITY_DAYS), ca.certificate.not_valid_after_utc)
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SIGNING_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _write_pair(
    out_dir: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}-key.pem"
    for path in (cert_path, key_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} exists; it is never overwritten (move it away to issue a new one)")
    # Unencrypted: it is handed to systemd as a credential (LoadCredential=), which keeps it 0400 root.
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        replace=False,
    )
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), replace=False)
    return cert_path, key_path


def issue_station_cert(
    ca: LineCa, station: str, out_dir: Path, *, now: dt.datetime | None = None
) -> tuple[Path, Path]:
    """A client certificate whose CN is the station's name; returns (cert, key) paths."""
    require_label(station, "station name")
    if any(ch.isspace() for ch in station):
        raise InputError(f"station name must not contain whitespace, got {station!r}")
    cert, key = _endpoint_cert(
        ca,
        common_name=station,
        unit=STATION_OU,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[],
        now=now or _now(),
    )
    return _write_pair(out_dir, station, cert, key)


def issue_signer_cert(
    ca: LineCa, names: Sequence[str], out_dir: Path, *, now: dt.datetime | None = None
) -> tuple[Path, Path]:
    """The signer's TLS server certificate for its DNS names / IP addresses; returns (cert, key) paths."""
    if not names:
        raise InputError("the signer's certificate needs at least one DNS name or IP address")
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert, key = _endpoint_cert(
        ca,
        common_name=names[0],
        unit=SIGNER_OU,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
        now=now or _now(),
    )
    return _write_pair(out_dir, "signer", cert, key)


def _write_crl(
    ca: LineCa,
    revoked: Sequence[x509.RevokedCertificate],
    now: dt.datetime,
    *,
    after: dt.datetime | None = None,
) -> None:
    # A re-signed CRL must be strictly newer than the one it replaces: a running signer adds it to its
    # store and OpenSSL then checks with the CRL of the latest lastUpdate (whole seconds).
    last = now - BACKDATE if after is None else max(now - BACKDATE, after + dt.timedelta(seconds=1))
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(last)
        .next_update(last + dt.timedelta(days=CRL_VALIDITY_DAYS))
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    write_private(ca.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def revoke_station_cert(ca: LineCa, cert_pem: bytes, *, now: dt.datetime | None = None) -> int:
    """Add a station certificate to the CRL (the signer refuses its handshake after a restart); its serial."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise InputError("not a PEM certificate") from None
    if cert.issuer != ca.certificate.subject:
        raise InputError("the certificate was not issued by this line CA")
    when = now or _now()
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    revoked = list(crl)
    if all(entry.serial_number != cert.serial_number for entry in revoked):
        revoked.append(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(when).build()
        )
    _write_crl(ca, revoked, when, after=crl.last_update_utc)
    return cert.serial_number
