"""The SPAKE2+ verifier against the SDK's published vector.

Vector: passcode 20202021, salt "SPAKE2P Key Salt" (base64 U1BBS0UyUCBLZXkgU2FsdA==), 1000 iterations →
the verifier below: connectedhomeip ``src/include/platform/CHIPDeviceConfig.h``
(CHIP_DEVICE_CONFIG_USE_TEST_SPAKE2P_VERIFIER) and the documented output of
``scripts/tools/spake2p/spake2p.py gen-verifier -i 1000 -s U1BBS0UyUCBLZXkgU2FsdA== -p 20202021``.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.errors import InputError
from factoryd.matter.spake2p import (
    P256_ORDER,
    VERIFIER_BYTES,
    check_verifier_shape,
    compute_verifier,
    new_verifier,
)

SDK_SALT = base64.b64decode("U1BBS0UyUCBLZXkgU2FsdA==")
SDK_VERIFIER = base64.b64decode(
    "uWFwqugDNGiEck/po7KHwwMwwqZgN10XuyBajPGuyzUEV/iree4lOrao5GuwnlQ65CJzbeUB49s31EH+NEkg0JVI5MGCQGMMT/SRPFNRODm3wH"
    "/MBiehuFc6FJ/NH6Rmzw=="
)


def test_verifier_reproduces_the_sdk_test_vector() -> None:
    assert SDK_SALT == b"SPAKE2P Key Salt"
    verifier = compute_verifier(20202021, SDK_SALT, 1000)
    assert verifier.verifier == SDK_VERIFIER
    assert len(verifier.verifier) == VERIFIER_BYTES
    assert 0 < verifier.w0 < P256_ORDER
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), verifier.l_point)  # L is on P-256


def test_fresh_verifiers_differ_by_salt_and_have_the_right_shape() -> None:
    first = new_verifier(20202021, salt_bytes=32, iterations=1000)
    second = new_verifier(20202021, salt_bytes=32, iterations=1000)
    assert first.salt != second.salt
    assert first.verifier != second.verifier
    check_verifier_shape(first.verifier)


@pytest.mark.parametrize(
    ("passcode", "salt", "iterations"),
    [
        (12345678, SDK_SALT, 1000),  # a forbidden passcode
        (20202021, b"short", 1000),  # salt under 16 bytes
        (20202021, bytes(33), 1000),  # salt over 32 bytes
        (20202021, SDK_SALT, 999),  # too few iterations
        (20202021, SDK_SALT, 100_001),  # too many
    ],
)
def test_bad_parameters_are_refused(passcode: int, salt: bytes, iterations: int) -> None:
    with pytest.raises(InputError):
        compute_verifier(passcode, salt, iterations)


def test_a_malformed_verifier_is_refused() -> None:
    with pytest.raises(InputError):
        check_verifier_shape(SDK_VERIFIER[:-1])
    with pytest.raises(InputError):
        check_verifier_shape(SDK_VERIFIER[:32] + b"\x04" + bytes(64))  # not a point
