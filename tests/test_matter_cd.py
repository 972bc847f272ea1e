"""Certification Declarations: the SDK's signed test CDs parse and verify; ours match their encoding.

Vectors: connectedhomeip ``src/credentials/tests/TestCertificationDeclaration.cpp`` —
sTestCMS_SignerCert (the test CD signing certificate, SKID 62FA8233…), sTestCMS_SignedMessage01
(VID 0xFFF1, PIDs [0x8000], device type 0x1234, "ZIG20141ZB330001-24", version 0x2694) and
sTestCMS_SignedMessage02 (VID 0xFFF2, PIDs [0x8001, 0x8002], "ZIG20142ZB330002-24", DAC origin
0xFFF1/0x8000), copied as hex into tests/data/matter/sdk_cd_vectors.txt. openssl cms is the oracle for
the CMS envelope of the CDs we sign.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.matter.cd import TEST_CD_SIGNER_SKID, CdError, cd_content, parse_cd, sign_cd
from factoryd.matter.testing import make_matter_test_pki
from factoryd.pki import der
from tests.helpers.openssl import openssl

VECTORS = Path(__file__).parent / "data" / "matter" / "sdk_cd_vectors.txt"


def _vectors() -> dict[str, bytes]:
    out = {}
    for line in VECTORS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, hex_data = line.split()
            out[name] = bytes.fromhex(hex_data)
    return out


def _signed_data(data: bytes) -> list[der.Tlv]:
    content_info = der.read_single(data).children()
    return der.read_single(content_info[1].content).children()


def _signer_info(signed: list[der.Tlv]) -> list[der.Tlv]:
    return signed[3].children()[0].children()


def test_the_sdk_test_cds_parse_with_the_published_fields_and_verify() -> None:
    vectors = _vectors()
    signer = x509.load_der_x509_certificate(vectors["SignerCert"])
    first = parse_cd(vectors["SignedMessage01"])
    first.verify(signer)
    assert (first.format_version, first.vendor_id, first.product_ids) == (1, 0xFFF1, (0x8000,))
    assert (first.device_type_id, first.certificate_id, first.version_number) == (
        0x1234,
        "ZIG20141ZB330001-24",
        0x2694,
    )
    assert (first.security_level, first.security_information, first.certification_type) == (0, 0, 0)
    assert first.dac_origin_vendor_id is None
    assert first.authorized_paa_skids == ()
    assert first.signer_skid == TEST_CD_SIGNER_SKID
    assert first.is_test_signed
    second = parse_cd(vectors["SignedMessage02"])
    second.verify(signer)
    assert (second.vendor_id, second.product_ids) == (0xFFF2, (0x8001, 0x8002))
    assert (second.dac_origin_vendor_id, second.dac_origin_product_id) == (0xFFF1, 0x8000)
    # With a DAC origin, the DAC must carry the origin IDs, not the CD's vendor_id.
    assert second.allows_dac_ids(0xFFF1, 0x8000)
    assert not second.allows_dac_ids(0xFFF2, 0x8001)


def test_our_tlv_content_is_the_sdks_byte_for_byte() -> None:
    sdk = parse_cd(_vectors()["SignedMessage01"])
    ours = cd_content(
        vendor_id=0xFFF1,
        product_ids=(0x8000,),
        device_type_id=0x1234,
        certificate_id="ZIG20141ZB330001-24",
        version_number=0x2694,
    )
    assert ours == sdk.content


def test_a_cd_we_sign_has_the_sdk_envelope_and_openssl_verifies_it(tmp_path: Path) -> None:
    sdk = _vectors()["SignedMessage01"]
    key = ec.generate_private_key(ec.SECP256R1())
    ours = sign_cd(parse_cd(sdk).content, key, TEST_CD_SIGNER_SKID)
    # Every element but the signature is the SDK's byte for byte (ECDSA signatures are randomised).
    ours_parts, sdk_parts = _signed_data(ours), _signed_data(sdk)
    assert [p.raw for p in ours_parts[:3]] == [p.raw for p in sdk_parts[:3]]
    ours_info, sdk_info = _signer_info(ours_parts), _signer_info(sdk_parts)
    assert [p.raw for p in ours_info[:4]] == [p.raw for p in sdk_info[:4]]
    pki = make_matter_test_pki(passphrase=b"x")
    (tmp_path / "cd.der").write_bytes(pki.cd_der)
    (tmp_path / "signer.pem").write_bytes(pki.cd_signer_pem)
    signer = str(tmp_path / "signer.pem")
    done = openssl(
        "cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "cd.der"), "-binary",
        "-certfile", signer, "-CAfile", signer, "-out", str(tmp_path / "content.bin"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "content.bin").read_bytes() == parse_cd(pki.cd_der).content


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: b"", "empty"),
        (lambda d: d[:-5], "DER"),
        (lambda d: b"\x30\x03\x02\x01\x03", "SignedData"),
        (lambda d: d + b"\x00", "DER"),
        (lambda d: bytes(700), "at most"),
    ],
)
def test_a_malformed_cd_is_refused_with_a_reason(mangle: object, reason: str) -> None:
    sdk = _vectors()["SignedMessage01"]
    with pytest.raises(CdError, match=reason):
        parse_cd(mangle(sdk))  # type: ignore[operator]


def test_a_cd_with_a_bad_tlv_or_field_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    short_id = cd_content(vendor_id=1, product_ids=(1,), device_type_id=1, certificate_id="too short")
    with pytest.raises(CdError, match="certificate_id"):
        parse_cd(sign_cd(short_id, key, TEST_CD_SIGNER_SKID))
    with pytest.raises(CdError, match="TLV"):
        parse_cd(sign_cd(b"\x15\x24\x00", key, TEST_CD_SIGNER_SKID))


def test_a_cd_does_not_verify_with_another_signer() -> None:
    vectors = _vectors()
    other = make_matter_test_pki(passphrase=b"x").cd_signer
    with pytest.raises(CdError, match="SKID"):
        parse_cd(vectors["SignedMessage01"]).verify(other)
