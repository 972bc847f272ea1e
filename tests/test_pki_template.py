"""Subject templates: checked at lot creation, rendered per device, openssl- and pkilint-clean."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from factoryd.errors import ConfigError, CsrRejectedError, IssuanceError
from factoryd.ledger.profile import LotProfile
from factoryd.pki import CertProfile, Issuer, load_pkcs12_bundle
from factoryd.pki.template import SubjectTemplate
from factoryd.pki.testca import TestPki, make_test_pki

PASSPHRASE = b"template-test"
DEVICE_ID = "6ba7b810-9dad-41d1-80b4-00c04fd430c8"
OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return make_test_pki(passphrase=PASSPHRASE)


def _issuer(pki: TestPki, profile: LotProfile) -> Issuer:
    bundle = load_pkcs12_bundle(pki.pkcs12, PASSPHRASE)
    return Issuer(bundle.signer(), bundle.chain, CertProfile(subject=profile.subject_template()))


def _csr(common_name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


GOLIOTH = LotProfile(
    subject="C=DE, O={project}, OU=line-1, CN={id}",
    subject_fields={"project": "acme-sensors"},
    san_uris=("urn:acme:device:{id}",),
    san_dns=("{id}.devices.acme.example",),
)


def test_default_template_keeps_todays_subject(pki: TestPki) -> None:
    issuer = _issuer(pki, LotProfile())
    assert issuer.common_name(DEVICE_ID) == DEVICE_ID
    issued = issuer.issue(issuer.verify_csr(_csr(DEVICE_ID), DEVICE_ID), DEVICE_ID)
    assert issued.cert.subject.rfc4514_string() == f"CN={DEVICE_ID}"
    with pytest.raises(x509.ExtensionNotFound):
        issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_templated_subject_and_sans(pki: TestPki) -> None:
    issuer = _issuer(pki, GOLIOTH)
    issued = issuer.issue(issuer.verify_csr(_csr(DEVICE_ID), DEVICE_ID), DEVICE_ID)
    # Written most significant first; RFC 4514 prints the other way round.
    assert issued.cert.subject.rfc4514_string() == f"CN={DEVICE_ID},OU=line-1,O=acme-sensors,C=DE"
    san = issued.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:acme:device:{DEVICE_ID}"]
    assert san.value.get_values_for_type(x509.DNSName) == [f"{DEVICE_ID}.devices.acme.example"]


def test_csr_check_follows_the_templated_cn(pki: TestPki) -> None:
    profile = LotProfile(subject="O=acme, CN=dev-{meta.serial_number}-{id}", id_format="regex:[a-z0-9]+")
    issuer = _issuer(pki, profile)
    metadata = {"serial_number": "SN0042"}
    cn = issuer.common_name("abc1", metadata)
    assert cn == "dev-SN0042-abc1"
    csr = issuer.verify_csr(_csr(cn), "abc1", fields=metadata)
    # A CSR naming the bare ID is not what this lot's board must send.
    with pytest.raises(CsrRejectedError, match="dev-SN0042-abc1"):
        issuer.verify_csr(_csr("abc1"), "abc1", fields=metadata)
    issued = issuer.issue(csr, "abc1", fields=metadata)
    assert issued.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({"serial_number": "SN,1"}, "','"),
        ({"serial_number": "x" * 200}, "RFC 5280 allows 1..64"),
        ({"serial_number": "SN\x07"}, "control characters"),
        ({}, "column 'serial_number'"),
    ],
)
def test_bad_per_device_values_are_refused_before_signing(
    pki: TestPki, metadata: dict[str, str], problem: str
) -> None:
    issuer = _issuer(pki, LotProfile(subject="serialNumber={meta.serial_number}, CN={id}"))
    csr = issuer.verify_csr(_csr(DEVICE_ID), DEVICE_ID, fields={"serial_number": "ok"})
    with pytest.raises(IssuanceError, match=problem):
        issuer.common_name(DEVICE_ID, metadata)
    with pytest.raises(IssuanceError, match=problem):
        issuer.issue(csr, DEVICE_ID, fields=metadata)


def test_printable_string_attribute_refuses_other_characters(pki: TestPki) -> None:
    issuer = _issuer(pki, LotProfile(subject="serialNumber={meta.sn}, CN={id}"))
    with pytest.raises(IssuanceError, match="PrintableString"):
        issuer.common_name(DEVICE_ID, {"sn": "a_b"})


def test_long_device_id_cannot_be_a_common_name(pki: TestPki) -> None:
    issuer = _issuer(pki, LotProfile(id_format="regex:[a-z]+"))
    with pytest.raises(IssuanceError, match="65 characters long"):
        issuer.common_name("a" * 65)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"subject": "CN=fixed"}, "exactly one CN, containing {id}"),
        ({"subject": "CN={id}, CN={id}"}, "CN appears more than once"),
        ({"subject": "O=acme"}, "exactly one CN"),
        ({"subject": "E=a@b, CN={id}"}, "unknown attribute type 'E'"),
        ({"subject": "O={org}, CN={id}"}, "undefined field"),
        ({"subject": "CN={id}", "subject_fields": {"org": "acme"}}, "not used"),
        ({"subject": "O={org}, CN={id}", "subject_fields": {"org": "a,b"}}, "not TYPE=VALUE|','"),
        ({"subject": "O={org}, CN={id}", "subject_fields": {"org": "a+b"}}, "'\\+'"),
        ({"subject": "O={org}, CN={id}", "subject_fields": {"org": "x" * 65}}, "limit of 64"),
        ({"subject": "C=Germany, CN={id}"}, "limit of 2"),
        ({"subject": "C=D, CN={id}"}, "must be 2 characters"),
        ({"subject": "O=a, O=b, CN={id}"}, "O appears more than once"),
        ({"subject": "CN={id!r}"}, "format spec or conversion"),
        ({"subject": "CN={id:>40}"}, "format spec or conversion"),
        ({"subject": "CN={id"}, "placeholder"),
        ({"subject": "CN=" + "x" * 30 + "{id}"}, "at least 66 characters"),
        ({"subject": "CN={id}", "san_uris": ["no-scheme-{id}"]}, "must start with its scheme"),
        ({"subject": "CN={id}", "san_dns": ["{id}_x.example"]}, "host name"),
        ({"subject": "O={id}, CN={id}", "subject_fields": {"id": "x"}}, "not a field name"),
        ({"protocol": "arduino-v1", "subject": "O=acme, CN={id}"}, "fixed subject"),
        ({"protocol": "arduino-v1", "san_uris": ["urn:x:{id}"]}, "fixed subject"),
    ],
)
def test_lot_creation_refuses_bad_templates(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        LotProfile.model_validate(fields)


def test_literal_text_around_a_placeholder_may_hold_spaces() -> None:
    """Only the ends of the rendered value matter: "dev {id}" is a fine CN."""
    profile = LotProfile.model_validate(
        {"subject": "CN=dev {id}, O={org} GmbH", "subject_fields": {"org": "Acme"}}
    )
    assert profile.subject == "CN=dev {id}, O={org} GmbH"


def test_arduino_profile_refuses_a_template_directly() -> None:
    with pytest.raises(ConfigError, match="fixed subject"):
        CertProfile(kind="arduino-v1", subject=SubjectTemplate.parse("O=x, CN={id}"))
    assert CertProfile(kind="arduino-v1").subject.is_default


def test_profile_round_trips_through_json() -> None:
    again = LotProfile.model_validate_json(GOLIOTH.model_dump_json())
    assert again == GOLIOTH
    assert again.subject_template().render(DEVICE_ID).common_name == DEVICE_ID


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
def test_openssl_verifies_a_templated_certificate(pki: TestPki, tmp_path: Path) -> None:
    issuer = _issuer(pki, GOLIOTH)
    issued = issuer.issue(issuer.verify_csr(_csr(DEVICE_ID), DEVICE_ID), DEVICE_ID)
    (tmp_path / "root.pem").write_bytes(issuer.chain[-1].public_bytes(serialization.Encoding.PEM))
    (tmp_path / "issuing.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issuer.chain[:-1])
    )
    (tmp_path / "device.pem").write_text(issued.pem)
    result = subprocess.run(  # noqa: S603 - fixed argv
        [OPENSSL, "verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "issuing.pem", "device.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _pkilint(path: Path) -> set[str]:
    result = subprocess.run(  # noqa: S603 - fixed argv, test files only
        ["lint_pkix_cert", "lint", "-s", "WARNING", "-f", "JSON", str(path)],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stderr == ""
    return {f["code"] for item in json.loads(result.stdout)["results"] for f in item["finding_descriptions"]}


@pytest.mark.skipif(shutil.which("lint_pkix_cert") is None, reason="pkilint not installed")
def test_pkilint_finds_nothing_in_a_templated_certificate(pki: TestPki, tmp_path: Path) -> None:
    profile = GOLIOTH.model_copy(update={"san_uris": ("https://devices.acme.example/{id}",)})
    issuer = _issuer(pki, profile)
    issued = issuer.issue(issuer.verify_csr(_csr(DEVICE_ID), DEVICE_ID), DEVICE_ID)
    (tmp_path / "device.pem").write_text(issued.pem)
    assert _pkilint(tmp_path / "device.pem") == set()
    # RFC 5280 4.2.1.6 allows any absolute URI, URNs included; pkilint checks URI SANs with
    # validators.url, which knows only URLs with a host, and says so in exactly one finding.
    urn = _issuer(pki, GOLIOTH)
    issued = urn.issue(urn.verify_csr(_csr(DEVICE_ID), DEVICE_ID), DEVICE_ID)
    (tmp_path / "urn.pem").write_text(issued.pem)
    assert _pkilint(tmp_path / "urn.pem") == {"pkix.invalid_uri_syntax"}
