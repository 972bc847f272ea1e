"""One Matter device's commissioning data, made fresh per board, and the factory-data object it becomes.

The board stores the SPAKE2+ verifier, salt and iteration count, the discriminator and a rotating-
device-ID unique ID, never the passcode: the passcode exists only in this process's memory (and,
inside the onboarding codes, sealed in the ledger). The object is a Matter TLV structure, so
firmware built on the Matter SDK reads it with its own ``TLVReader``:

| tag | field | type |
|---|---|---|
| 1 | discriminator | unsigned int (12 bits) |
| 2 | iteration count | unsigned int |
| 3 | salt | byte string (16..32) |
| 4 | verifier (w0 ‖ L) | byte string (97) |
| 5 | rotating device ID unique ID | byte string (16) |
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from factoryd.errors import InputError
from factoryd.matter import tlv
from factoryd.matter.payload import (
    CommissioningFlow,
    OnboardingCodes,
    Rendezvous,
    SetupPayload,
    check_discriminator,
    check_passcode,
    random_discriminator,
    random_passcode,
)
from factoryd.matter.profile import MatterProfile
from factoryd.matter.spake2p import (
    Spake2pVerifier,
    check_pbkdf_parameters,
    check_verifier_shape,
    new_verifier,
)

# The spec asks for at least 128 bits (5.4.2.3, RotatingDeviceIdUniqueID); esp-matter-mfg-tool writes 16.
RD_ID_UID_BYTES = 16
TAG_DISCRIMINATOR = 1
TAG_ITERATIONS = 2
TAG_SALT = 3
TAG_VERIFIER = 4
TAG_RD_ID_UID = 5


@dataclass(frozen=True, slots=True)
class CommissioningData:
    """What the board keeps for PASE and discovery (no passcode)."""

    discriminator: int
    verifier: Spake2pVerifier
    rd_id_uid: bytes

    def encode(self) -> bytes:
        """The factory-data object (Matter TLV)."""
        return tlv.encode_container(
            None,
            "struct",
            [
                tlv.encode_uint(TAG_DISCRIMINATOR, self.discriminator),
                tlv.encode_uint(TAG_ITERATIONS, self.verifier.iterations),
                tlv.encode_bytes(TAG_SALT, self.verifier.salt),
                tlv.encode_bytes(TAG_VERIFIER, self.verifier.verifier),
                tlv.encode_bytes(TAG_RD_ID_UID, self.rd_id_uid),
            ],
        )


def parse_commissioning(data: bytes) -> CommissioningData:
    """Decode and check a commissioning object (as a board would before using it); InputError otherwise."""
    root = tlv.decode(data)
    if root.kind != "struct":
        raise InputError("the commissioning object is not a TLV structure")
    fields = {m.tag: m.value for m in root.members()}
    if set(fields) != {TAG_DISCRIMINATOR, TAG_ITERATIONS, TAG_SALT, TAG_VERIFIER, TAG_RD_ID_UID}:
        raise InputError(f"the commissioning object has tags {sorted(t for t in fields if t is not None)}")
    discriminator, iterations = fields[TAG_DISCRIMINATOR], fields[TAG_ITERATIONS]
    salt, verifier, uid = fields[TAG_SALT], fields[TAG_VERIFIER], fields[TAG_RD_ID_UID]
    if not isinstance(discriminator, int) or not isinstance(iterations, int):
        raise InputError("the commissioning object's discriminator or iteration count is not an integer")
    if not isinstance(salt, bytes) or not isinstance(verifier, bytes) or not isinstance(uid, bytes):
        raise InputError("the commissioning object's salt, verifier or unique ID is not a byte string")
    check_discriminator(discriminator)
    check_pbkdf_parameters(salt, iterations)
    check_verifier_shape(verifier)
    if len(uid) < RD_ID_UID_BYTES:
        raise InputError(f"the rotating device ID unique ID is shorter than {RD_ID_UID_BYTES} bytes")
    return CommissioningData(discriminator, Spake2pVerifier(verifier, salt, iterations), uid)


@dataclass(frozen=True, slots=True)
class DeviceSecrets:
    """A fresh passcode and everything derived from it for one board; the passcode never leaves memory."""

    passcode: int = field(repr=False)
    commissioning: CommissioningData
    codes: OnboardingCodes
    product_id: int

    def __repr__(self) -> str:
        return f"DeviceSecrets(discriminator={self.commissioning.discriminator}, passcode=***)"


def new_device_secrets(profile: MatterProfile, product_id: int) -> DeviceSecrets:
    """A fresh random passcode (never a forbidden one), discriminator, salt, verifier and codes."""
    passcode = check_passcode(random_passcode())
    discriminator = random_discriminator(profile.discriminator_min, profile.discriminator_max)
    verifier = new_verifier(passcode, salt_bytes=profile.salt_bytes, iterations=profile.iterations)
    payload = SetupPayload(
        discriminator=discriminator,
        passcode=passcode,
        vendor_id=profile.vendor_id,
        product_id=product_id,
        flow=CommissioningFlow(profile.flow),
        rendezvous=Rendezvous(profile.rendezvous),
    )
    return DeviceSecrets(
        passcode=passcode,
        commissioning=CommissioningData(discriminator, verifier, secrets.token_bytes(RD_ID_UID_BYTES)),
        codes=payload.codes(),
        product_id=product_id,
    )
