"""Generate the hostile certificate-bundle corpus: one bundle per refusal, expectations in expected.json.

Run ``python tests/data/bad/bundles/make_corpus.py`` to regenerate (keys are random, dates are
fixed so the files do not age: good certificates run 2020..2099). Each ``expected.json`` entry names
the files, the passphrase, optional ``max_bytes`` and ``profile`` arguments, and the error fragment.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from factoryd.pki.profile import ARDUINO_ISSUER

PASSPHRASE = b"corpus-passphrase"
GOOD_FROM = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
GOOD_UNTIL = dt.datetime(2099, 12, 31, tzinfo=dt.UTC)

AnyKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "corpus"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: x509.Name,
    key: AnyKey,
    issuer: x509.Name | None = None,
    issuer_key: AnyKey | None = None,
    *,
    ca: bool | None = True,
    path_length: int | None = None,
    key_cert_sign: bool = True,
    not_before: dt.datetime = GOOD_FROM,
    not_after: dt.datetime = GOOD_UNTIL,
    serial: int = 1,
) -> x509.Certificate:
    signing_key = issuer_key or key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
    algorithm = None if isinstance(signing_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signing_key, algorithm)


def _p12(key: AnyKey, cert: x509.Certificate | None, extra: list[x509.Certificate]) -> bytes:
    encryption = serialization.BestAvailableEncryption(PASSPHRASE)
    return pkcs12.serialize_key_and_certificates(b"ca", key, cert, extra or None, encryption)


def _pem_key(key: AnyKey, *, encrypted: bool = True) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(PASSPHRASE) if encrypted else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class _Root:
    """A good root every case can hang its issuing CA under."""

    def __init__(self, cn: str = "Corpus Root", path_length: int | None = None) -> None:
        self.key = _p256()
        self.name = _name(cn)
        self.cert = _cert(self.name, self.key, path_length=path_length, serial=100)

    def issue(self, key: AnyKey, subject: x509.Name | None = None, **kwargs: Any) -> x509.Certificate:
        return _cert(subject or _name("Corpus Issuing CA"), key, self.name, self.key, serial=200, **kwargs)


Case = dict[str, Any]
Files = dict[str, bytes]


def _p12_case(name: str, error: str, data: bytes, **extra: Any) -> tuple[Case, Files]:
    return {"name": name, "format": "pkcs12", "files": {"pkcs12": f"{name}.p12"}, "error": error, **extra}, {
        f"{name}.p12": data
    }


def _pem_case(
    name: str, error: str, key: bytes, chain: bytes, anchors: bytes | None = None, **extra: Any
) -> tuple[Case, Files]:
    files = {"key": f"{name}.key.pem", "chain": f"{name}.chain.pem"}
    blobs = {f"{name}.key.pem": key, f"{name}.chain.pem": chain}
    if anchors is not None:
        files["trust_anchors"] = f"{name}.anchors.pem"
        blobs[f"{name}.anchors.pem"] = anchors
    return {"name": name, "format": "pem", "files": files, "error": error, **extra}, blobs


def build_corpus() -> list[tuple[Case, Files]]:
    """Every hostile case with its files (in memory)."""
    root = _Root()
    key = _p256()
    good = root.issue(key, path_length=0)
    good_p12 = _p12(key, good, [root.cert])
    cases: list[Callable[[], tuple[Case, Files]]] = [
        lambda: _p12_case(
            "p12_wrong_passphrase", "wrong passphrase", good_p12, passphrase="not-the-passphrase"
        ),
        lambda: _p12_case("p12_empty_passphrase", "a passphrase is required", good_p12, passphrase=""),
        lambda: _p12_case("p12_malformed", "malformed PKCS#12", b"this is not a PKCS#12 file\n" * 4),
        lambda: _p12_case("p12_truncated", "malformed PKCS#12", good_p12[: len(good_p12) // 2]),
        lambda: _p12_case("p12_oversize", "too large", good_p12, max_bytes=256),
        lambda: _p12_case("p12_key_mismatch", "does not match", _p12(_p256(), None, [good, root.cert])),
        lambda: _p12_case("p12_not_ca", "is not a CA", _p12(key, root.issue(key, ca=False), [root.cert])),
        lambda: _p12_case(
            "p12_no_basic_constraints", "is not a CA", _p12(key, root.issue(key, ca=None), [root.cert])
        ),
        lambda: _p12_case(
            "p12_no_keycertsign",
            "lacks the keyCertSign",
            _p12(key, root.issue(key, key_cert_sign=False), [root.cert]),
        ),
        lambda: _p12_case(
            "p12_expired",
            "has expired",
            _p12(
                key,
                root.issue(key, not_before=GOOD_FROM, not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC)),
                [root.cert],
            ),
        ),
        lambda: _p12_case(
            "p12_not_yet_valid",
            "not yet valid",
            _p12(key, root.issue(key, not_before=dt.datetime(2098, 1, 1, tzinfo=dt.UTC)), [root.cert]),
        ),
        lambda: _p12_case(
            "p12_ca_ends_before_devices",
            "before device certificates issued now",
            _p12(key, root.issue(key, not_after=dt.datetime(2049, 6, 1, tzinfo=dt.UTC)), [root.cert]),
            profile={"kind": "factoryd-v1", "cert_validity_days": 36500},
        ),
        lambda: _p12_case("p12_chain_missing_root", "is not in the bundle", _p12(key, good, [])),
        lambda: _p12_case(
            "p12_chain_bad_signature", "does not verify with the key", _p12(key, good, [_Root().cert])
        ),
        _pathlen_case,
        _chain_expired_case,
        lambda: _unsupported_case(
            "p12_rsa1024",
            "unsupported key type: RSA 1024",
            rsa.generate_private_key(65537, 1024),  # noqa: S505 - refused on purpose
        ),
        lambda: _unsupported_case(
            "p12_ec_p521", "unsupported key type: EC secp521r1", ec.generate_private_key(ec.SECP521R1())
        ),
        lambda: _unsupported_case(
            "p12_ed25519", "unsupported key type", ed25519.Ed25519PrivateKey.generate()
        ),
        lambda: _p12_case(
            "p12_arduino_wrong_dn",
            "CA subject must be exactly",
            good_p12,
            profile={"kind": "arduino-v1", "validity_years": 20},
        ),
        _arduino_utf8_case,
        _arduino_p384_case,
        lambda: _pem_case(
            "pem_unencrypted_key", "not encrypted", _pem_key(key, encrypted=False), _pem(good, root.cert)
        ),
        lambda: _pem_case(
            "pem_wrong_passphrase",
            "wrong passphrase",
            _pem_key(key),
            _pem(good, root.cert),
            passphrase="not-the-passphrase",
        ),
        lambda: _pem_case(
            "pem_malformed_key",
            "malformed key file",
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n!!\n",
            _pem(good),
        ),
        lambda: _pem_case(
            "pem_malformed_chain", "malformed chain file", _pem_key(key), b"no certificates here\n"
        ),
        lambda: _pem_case("pem_key_mismatch", "does not match", _pem_key(_p256()), _pem(good, root.cert)),
        lambda: _pem_case(
            "pem_unrelated_cert_in_chain",
            "is not part of the CA's chain",
            _pem_key(key),
            _pem(good, root.cert, _Root("Other").cert),
        ),
        lambda: _pem_case(
            "pem_trust_anchor_expired",
            "has expired",
            _pem_key(key),
            _pem(good, root.cert),
            _pem(_cert(_name("Old Server CA"), _p256(), not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC))),
        ),
        lambda: _pem_case(
            "pem_malformed_trust_anchors",
            "malformed trust anchor file",
            _pem_key(key),
            _pem(good, root.cert),
            b"junk\n",
        ),
        lambda: _pem_case(
            "pem_oversize_chain",
            "chain file is too large",
            _pem_key(key),
            _pem(good, root.cert),
            max_bytes=900,
        ),
    ]
    return [make() for make in cases]


def _pathlen_case() -> tuple[Case, Files]:
    root = _Root("PathLen Root", path_length=0)
    mid_key = _p256()
    mid = _cert(_name("Middle CA"), mid_key, root.name, root.key, serial=300)
    key = _p256()
    issuing = _cert(_name("Corpus Issuing CA"), key, mid.subject, mid_key, path_length=0, serial=301)
    return _p12_case("p12_path_length", "path length violated", _p12(key, issuing, [mid, root.cert]))


def _chain_expired_case() -> tuple[Case, Files]:
    root_key = _p256()
    old_root = _cert(
        _name("Expired Root"), root_key, not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC), serial=400
    )
    key = _p256()
    issuing = _cert(_name("Corpus Issuing CA"), key, old_root.subject, root_key, path_length=0, serial=401)
    return _p12_case("p12_chain_cert_expired", "has expired", _p12(key, issuing, [old_root]))


def _unsupported_case(name: str, error: str, key: AnyKey) -> tuple[Case, Files]:
    root = _Root()
    return _p12_case(name, error, _p12(key, root.issue(key, path_length=0), [root.cert]))


def _arduino_utf8_case() -> tuple[Case, Files]:
    # Right words, wrong string type: the board's template uses PrintableString, so signatures would break.
    utf8_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Arduino LLC US"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "IT"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Arduino"),
        ]
    )
    root = _Root()
    key = _p256()
    return _p12_case(
        "p12_arduino_utf8_dn",
        "CA subject must be exactly",
        _p12(key, root.issue(key, subject=utf8_name, path_length=0), [root.cert]),
        profile={"kind": "arduino-v1", "validity_years": 20},
    )


def _arduino_p384_case() -> tuple[Case, Files]:
    root = _Root()
    key = ec.generate_private_key(ec.SECP384R1())
    return _p12_case(
        "p12_arduino_p384",
        "must be EC P-256",
        _p12(key, root.issue(key, subject=ARDUINO_ISSUER, path_length=0), [root.cert]),
        profile={"kind": "arduino-v1", "validity_years": 20},
    )


def write_corpus(directory: Path) -> list[Case]:
    """Write every case's files plus expected.json into ``directory``."""
    expected: list[Case] = []
    for case, files in build_corpus():
        case.setdefault("passphrase", PASSPHRASE.decode())
        for filename, data in files.items():
            (directory / filename).write_bytes(data)
        expected.append(case)
    (directory / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    return expected


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    written = write_corpus(out)
    print(f"wrote {len(written)} cases to {out}")
