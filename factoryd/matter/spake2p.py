"""The SPAKE2+ verifier a Matter device keeps instead of its setup passcode (spec 3.10, 5.1.1.6).

w0s || w1s = PBKDF2-HMAC-SHA256(passcode as 4 little-endian bytes, salt, iterations, 80 bytes);
w0 = w0s mod n, w1 = w1s mod n (each half big-endian, n the P-256 group order), L = w1 * G.
The verifier is w0 (32 bytes, big-endian) || L (65 bytes, uncompressed SEC1): 97 bytes. It lets
the device prove knowledge of the passcode during PASE without ever holding the passcode itself.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.errors import InputError
from factoryd.matter.payload import check_passcode
from factoryd.matter.profile import (
    PBKDF_MAX_ITERATIONS,
    PBKDF_MIN_ITERATIONS,
    SALT_MAX_BYTES,
    SALT_MIN_BYTES,
)

# The order n of the P-256 base point (SEC 2, secp256r1).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# Each half of the PBKDF output is 40 bytes: 64 bits above the 256-bit order make the reduction
# mod n unbiased (spec 3.10, "Computation of pA, pB").
WS_HALF_BYTES = 40
W0_BYTES = 32
L_BYTES = 65
VERIFIER_BYTES = W0_BYTES + L_BYTES


@dataclass(frozen=True, slots=True)
class Spake2pVerifier:
    """What the device stores for PASE: the verifier, its salt and the PBKDF iteration count."""

    verifier: bytes
    salt: bytes
    iterations: int

    @property
    def w0(self) -> int:
        """w0 as an integer."""
        return int.from_bytes(self.verifier[:W0_BYTES], "big")

    @property
    def l_point(self) -> bytes:
        """L = w1 * G, uncompressed."""
        return self.verifier[W0_BYTES:]


def check_pbkdf_parameters(salt: bytes, iterations: int) -> None:
    """InputError unless the salt is 16..32 bytes and the iteration count 1000..100000."""
    if not SALT_MIN_BYTES <= len(salt) <= SALT_MAX_BYTES:
        raise InputError(
            f"the SPAKE2+ salt must be {SALT_MIN_BYTES}..{SALT_MAX_BYTES} bytes, got {len(salt)}"
        )
    if not PBKDF_MIN_ITERATIONS <= iterations <= PBKDF_MAX_ITERATIONS:
        raise InputError(
            f"the SPAKE2+ iteration count must be {PBKDF_MIN_ITERATIONS}..{PBKDF_MAX_ITERATIONS}, "
            f"got {iterations}"
        )


def compute_verifier(passcode: int, salt: bytes, iterations: int) -> Spake2pVerifier:
    """The SPAKE2+ verifier of ``passcode`` (checked against the passcode rules) for ``salt``."""
    check_passcode(passcode)
    check_pbkdf_parameters(salt, iterations)
    ws = hashlib.pbkdf2_hmac(
        "sha256", passcode.to_bytes(4, "little"), salt, iterations, dklen=2 * WS_HALF_BYTES
    )
    w0 = int.from_bytes(ws[:WS_HALF_BYTES], "big") % P256_ORDER
    w1 = int.from_bytes(ws[WS_HALF_BYTES:], "big") % P256_ORDER
    if w1 == 0:
        # Probability 2^-256; a zero scalar has no public point.
        raise InputError("the passcode and salt give w1 = 0; draw another salt")
    point = ec.derive_private_key(w1, ec.SECP256R1()).public_key()
    l_bytes = point.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return Spake2pVerifier(w0.to_bytes(W0_BYTES, "big") + l_bytes, salt, iterations)


def new_verifier(passcode: int, *, salt_bytes: int, iterations: int) -> Spake2pVerifier:
    """A verifier of ``passcode`` under a fresh random salt."""
    return compute_verifier(passcode, secrets.token_bytes(salt_bytes), iterations)


def check_verifier_shape(verifier: bytes) -> None:
    """InputError unless ``verifier`` is w0 (< n) followed by a point on P-256."""
    if len(verifier) != VERIFIER_BYTES:
        raise InputError(f"a SPAKE2+ verifier is {VERIFIER_BYTES} bytes, got {len(verifier)}")
    if int.from_bytes(verifier[:W0_BYTES], "big") >= P256_ORDER:
        raise InputError("the verifier's w0 is not reduced mod n")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), verifier[W0_BYTES:])
    except ValueError:
        raise InputError("the verifier's L is not a point on P-256") from None
