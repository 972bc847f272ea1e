"""Matter onboarding payloads against the connectedhomeip SDK's published vectors, Verhoeff against stdnum.

Sources of the vectors (project-chip/connectedhomeip):
- ``src/setup_payload/tests/TestHelpers.h``: kDefaultPayloadQRCode "MT:M5L90MP500K64J00000" for
  VID 12, PID 1, flow standard, SoftAP, discriminator 128, passcode 2048.
- ``src/setup_payload/tests/TestQRCode.cpp`` (TestBase38): base-38 of {10}, {10,10}, {10,10,10},
  "Hello World!", the maximum chunk values and the invalid-character cases.
- ``src/setup_payload/tests/TestManualCode.cpp``: passcode 123456780 / discriminator 2560 →
  "2361087535" + check digit; custom flow with VID/PID 45367/14526 → "63610875354536714526" + check;
  all-ones → "76553581916553565535" + check; the parser case "52927623630456200032" → passcode
  38728284, discriminator 1280 (short 5), VID 4562, PID 32.
- The SDK's default test device (``CHIP_DEVICE_CONFIG_USE_TEST_SETUP_PIN_CODE`` 20202021,
  discriminator 3840; the examples' ``onboardingcodes`` output in the nRF Connect and
  ``docs/guides/*`` docs): "MT:W0GU2OTB00KA0648G00" (VID 0x235A, PID 0x4E4B, BLE) and "34970112332",
  and the long code 749701123309050200434 of the same device.
- ``../shared/MATTER.md`` section 5 (from the SDK's ``src/setup_payload/python`` tool tests):
  "MT:00000CQM00KA0648G00", "MT:Y.K9042C00KA0648G00" and "MT:KSNK4SIC13-JPR4UY00" / "702871264504387000187".
"""

from __future__ import annotations

import pytest
from stdnum import verhoeff  # the library the SDK's Python SetupPayload tool uses for the check digit

from factoryd.errors import InputError
from factoryd.matter.payload import (
    FORBIDDEN_PASSCODES,
    CommissioningFlow,
    OnboardingCodes,
    Rendezvous,
    SetupPayload,
    base38_decode,
    base38_encode,
    check_passcode,
    manual_code,
    parse_manual_code,
    parse_qr_payload,
    qr_payload,
    random_discriminator,
    random_passcode,
    verhoeff_check_digit,
)

QR_VECTORS = [
    # (discriminator, passcode, vid, pid, flow, rendezvous, payload)
    (128, 2048, 12, 1, CommissioningFlow.STANDARD, Rendezvous.SOFT_AP, "MT:M5L90MP500K64J00000"),
    (3840, 20202021, 0x235A, 0x4E4B, CommissioningFlow.STANDARD, Rendezvous.BLE, "MT:W0GU2OTB00KA0648G00"),
    (3840, 20202021, 0, 0, CommissioningFlow.STANDARD, Rendezvous.ON_NETWORK, "MT:00000CQM00KA0648G00"),
    (3840, 20202021, 0xFFF1, 0x8000, CommissioningFlow.STANDARD, Rendezvous.BLE, "MT:Y.K9042C00KA0648G00"),
    (
        3091,
        43338551,
        0x1123,
        0x0012,
        CommissioningFlow.CUSTOM,
        Rendezvous.ON_NETWORK,
        "MT:KSNK4SIC13-JPR4UY00",
    ),
]


@pytest.mark.parametrize("vector", QR_VECTORS)
def test_qr_payload_reproduces_the_sdk_vectors_and_decodes_back(
    vector: tuple[int, int, int, int, CommissioningFlow, Rendezvous, str],
) -> None:
    disc, pin, vid, pid, flow, rdv, expected = vector
    payload = SetupPayload(disc, pin, vid, pid, flow=flow, rendezvous=rdv)
    assert qr_payload(payload) == expected
    assert parse_qr_payload(expected) == payload


def test_base38_reproduces_the_sdk_vectors() -> None:
    assert base38_encode(b"") == ""
    assert base38_encode(bytes([10])) == "A0"
    assert base38_encode(bytes([10, 10])) == "OT10"
    assert base38_encode(bytes([10, 10, 10])) == "-N.B0"
    assert base38_encode(bytes([10, 10, 0])) == "OT100"
    assert base38_encode(bytes([10, 10, 40])) == "Y6V91"
    assert base38_encode(bytes([10, 10, 41])) == "KL0B1"
    assert base38_encode(bytes([10, 10, 255])) == "Q-M08"
    assert base38_encode(bytes([35])) == "Z0"
    assert base38_encode(bytes([255, 0])) == "R600"
    assert base38_encode(bytes([46, 0, 0])) == "81000"
    assert base38_encode(bytes([255])) == "R6"
    assert base38_encode(bytes([255, 255])) == "NE71"
    assert base38_encode(bytes([255, 255, 255])) == "PLS18"
    assert base38_encode(b"Hello World!") == "KKHF3W2S013OPM3EJX11"
    assert base38_decode("KKHF3W2S013OPM3EJX11") == b"Hello World!"
    assert base38_decode("S600") == bytes([0, 1])
    assert base38_decode("OE710") == bytes([0, 0, 1])


@pytest.mark.parametrize("bad", ["0\x01", "[0", " 0", "!0", "@0", "S6", "OE71", "QLS18", "ABC"])
def test_base38_refuses_what_the_sdk_refuses(bad: str) -> None:
    with pytest.raises(InputError):
        base38_decode(bad)


def _with_check(digits: str) -> str:
    return digits + verhoeff.calc_check_digit(digits)


@pytest.mark.parametrize(
    "vector",
    [
        (2560, 123456780, 0, 0, CommissioningFlow.STANDARD, _with_check("2361087535")),
        (2560, 123456780, 45367, 14526, CommissioningFlow.STANDARD, _with_check("2361087535")),
        (2560, 123456780, 0, 0, CommissioningFlow.CUSTOM, _with_check("63610875350000000000")),
        (2560, 123456780, 1, 1, CommissioningFlow.CUSTOM, _with_check("63610875350000100001")),
        (2560, 123456780, 45367, 14526, CommissioningFlow.CUSTOM, _with_check("63610875354536714526")),
        (0xFFF, 0x7FFFFFF, 65535, 65535, CommissioningFlow.CUSTOM, _with_check("76553581916553565535")),
        (3840, 20202021, 0, 0, CommissioningFlow.STANDARD, "34970112332"),
        (3840, 20202021, 0x235A, 0x4E4B, CommissioningFlow.CUSTOM, "749701123309050200434"),
        (3091, 43338551, 0x1123, 0x0012, CommissioningFlow.CUSTOM, "702871264504387000187"),
    ],
)
def test_manual_code_reproduces_the_sdk_vectors(
    vector: tuple[int, int, int, int, CommissioningFlow, str],
) -> None:
    disc, pin, vid, pid, flow, expected = vector
    assert manual_code(SetupPayload(disc, pin, vid, pid, flow=flow)) == expected
    decoded = parse_manual_code(expected)
    assert decoded.passcode == pin
    assert decoded.discriminator == disc >> 8  # the manual code carries the short discriminator
    assert (decoded.vendor_id, decoded.product_id) == ((vid, pid) if flow else (0, 0))


def test_manual_code_parser_reads_the_sdk_parser_vector() -> None:
    decoded = parse_manual_code(_with_check("52927623630456200032"))
    assert (decoded.passcode, decoded.discriminator << 8, decoded.vendor_id, decoded.product_id) == (
        38728284,
        1280,
        4562,
        32,
    )


def test_our_verhoeff_check_digit_agrees_with_python_stdnum() -> None:
    for n in range(0, 10**6, 7919):
        digits = f"{n:010d}"
        assert verhoeff_check_digit(digits) == verhoeff.calc_check_digit(digits)


@pytest.mark.parametrize(
    "bad",
    [
        "02684354589",
        "3497011233",
        "3497011233x",
        _with_check("2327680000"),
        _with_check("23456789123456785610"),
    ],
)
def test_manual_code_parser_refuses_typos_and_bad_codes(bad: str) -> None:
    with pytest.raises(InputError):
        parse_manual_code(bad)


def test_qr_parser_refuses_a_bad_prefix_length_or_character() -> None:
    for bad in ("M5L90MP500K64J00000", "MT:M5L90MP500K64J0000", "MT:M5L90MP500K64J0000 "):
        with pytest.raises(InputError):
            parse_qr_payload(bad)


@pytest.mark.parametrize("forbidden", [*sorted(FORBIDDEN_PASSCODES), 99_999_999, 100_000_000, -1])
def test_forbidden_and_out_of_range_passcodes_are_refused_without_echoing_them(forbidden: int) -> None:
    with pytest.raises(InputError) as caught:
        check_passcode(forbidden)
    assert str(forbidden) not in str(caught.value) or forbidden in (-1, 0)


def test_random_passcodes_and_discriminators_keep_the_rules() -> None:
    passcodes = {random_passcode() for _ in range(2000)}
    assert len(passcodes) > 1990  # 27 bits of CSPRNG: collisions in 2000 draws are rare
    assert all(check_passcode(p) == p for p in passcodes)
    assert {random_discriminator(100, 101) for _ in range(200)} == {100, 101}
    with pytest.raises(InputError):
        random_discriminator(5, 4)


def test_codes_never_show_the_passcode_in_their_repr() -> None:
    payload = SetupPayload(3840, 20202021)
    codes = payload.codes()
    assert isinstance(codes, OnboardingCodes)
    assert "20202021" not in repr(payload)
    assert "34970112332" not in repr(codes)
    assert "MT:00000" not in repr(codes)
