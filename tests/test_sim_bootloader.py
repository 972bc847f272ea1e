"""The simulated MCUboot: two slots, test/permanent swaps, revert, rollback protection."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from factoryd.mcuboot import verify_image
from factoryd.sim.bootloader import BootRefusal, SimBootloader, Swap
from factoryd.sim.mcuboot_signer import sign_image

KEY = ec.generate_private_key(ec.SECP256R1())
PAYLOAD = bytes(range(256)) * 8


def image(version: str, key: ec.EllipticCurvePrivateKey = KEY) -> bytes:
    """An MCUboot image of PAYLOAD at ``version`` (security counter -s auto)."""
    return sign_image(PAYLOAD, key, version)


def hash_of(data: bytes) -> str:
    """The image's MCUboot hash."""
    return verify_image(data, KEY.public_key()).hash


def test_a_permanent_install_swaps_in_and_raises_the_counter() -> None:
    boot = SimBootloader(KEY.public_key())
    installed = boot.install(image("1.2.0"))
    assert boot.primary is not None
    assert boot.primary.image.hash == installed.hash == hash_of(image("1.2.0"))
    assert (boot.confirmed, boot.swap, boot.swaps) == (True, Swap.NONE, 1)
    assert boot.security_counter == 0x01020000


def test_an_unconfirmed_test_image_reverts_at_the_next_boot() -> None:
    boot = SimBootloader(KEY.public_key())
    boot.install(image("1.0.0"))
    boot.write_secondary(image("1.1.0"), permanent=False)
    boot.boot()
    assert boot.primary is not None
    assert boot.primary.image.version == "1.1.0+0"
    assert not boot.confirmed
    assert boot.security_counter == 0x01000000  # not raised before the image is confirmed
    boot.boot()  # reset without confirming
    assert boot.primary.image.version == "1.0.0+0"
    assert (boot.confirmed, boot.reverts) == (True, 1)


def test_a_confirmed_test_image_stays_and_raises_the_counter() -> None:
    boot = SimBootloader(KEY.public_key())
    boot.write_secondary(image("1.1.0"), permanent=False)
    boot.boot()
    boot.confirm()
    boot.boot()
    assert boot.primary is not None
    assert boot.primary.image.version == "1.1.0+0"
    assert (boot.security_counter, boot.reverts) == (0x01010000, 0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (image("1.0.0", ec.generate_private_key(ec.SECP256R1())), "signed by a different key"),
        (image("1.0.0")[:-1], "the file is truncated"),
        (b"not an image" * 4, "bad header magic"),
    ],
)
def test_invalid_images_are_refused_and_change_nothing(data: bytes, reason: str) -> None:
    boot = SimBootloader(KEY.public_key())
    boot.install(image("1.0.0"))
    primary = boot.primary
    with pytest.raises(BootRefusal, match=reason):
        boot.install(data)
    assert boot.primary is primary
    assert boot.swap is Swap.NONE


def test_a_security_counter_downgrade_is_refused() -> None:
    boot = SimBootloader(KEY.public_key())
    boot.install(image("2.0.0"))
    with pytest.raises(
        BootRefusal, match="security counter 16777216 is lower than the board's stored 33554432"
    ):
        boot.install(image("1.0.0"))
    boot.install(image("2.0.0"))  # equal is allowed


def test_an_image_too_big_for_the_slot_and_a_bootloader_without_key() -> None:
    with pytest.raises(BootRefusal, match="exceed the 1024-byte slot"):
        SimBootloader(KEY.public_key(), slot_bytes=1024).install(image("1.0.0"))
    with pytest.raises(BootRefusal, match="built without an image-signing key"):
        SimBootloader(None).install(image("1.0.0"))
