"""A small MCUboot model for the simulated boards: two slots, swaps, and hardware rollback protection.

As MCUboot (``MCUBOOT_SMP.md``, "Trailer, swap"): an image is written to the secondary slot and
marked for a test or a permanent swap. At the next boot the bootloader validates the secondary
image with the key it was built with (:func:`factoryd.mcuboot.verify_image`: hash, KEYHASH,
signature), refuses one whose security counter is below the stored one, and swaps it into the
primary slot. A test image that the application does not confirm before the next reset is
swapped back (revert). The stored counter rises once an image is permanent. The image "hash" a
board reports is the image's SHA256 TLV, as SMP's image state does.

No I/O: the native board (``factoryd.sim.board``) drives it at FW_END.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from factoryd.mcuboot import (
    DEFAULT_TRAILER_BYTES,
    McubootImage,
    McubootImageError,
    SigningPublicKey,
    verify_image,
)

# The simulated flash: 1 MiB image slots (the image plus MCUboot's trailer must fit).
DEFAULT_SLOT_BYTES = 1 << 20


class Swap(StrEnum):
    """What the secondary slot's trailer asks of the next boot."""

    NONE = "none"
    TEST = "test"  # swap, and revert at the following boot unless confirmed
    PERMANENT = "permanent"  # swap for good


class BootRefusal(Exception):  # noqa: N818 - a bootloader verdict inside the simulator, not an error
    """The bootloader refuses an image; ``str()`` is its reason."""


@dataclass(frozen=True)
class SlotImage:
    """An image in a slot: the bytes as written and what MCUboot's validation read from them."""

    data: bytes
    image: McubootImage


class SimBootloader:
    """MCUboot with a primary and a secondary slot, built with one image-signing key."""

    def __init__(
        self,
        key: SigningPublicKey | None,
        *,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        trailer_bytes: int = DEFAULT_TRAILER_BYTES,
    ) -> None:
        self.key = key
        self.slot_bytes = slot_bytes
        self.trailer_bytes = trailer_bytes
        self.primary: SlotImage | None = None  # None: the board maker's image, not an MCUboot one
        self.secondary: SlotImage | None = None
        self.swap = Swap.NONE
        self.confirmed = True  # the primary image is permanent
        self.security_counter = 0  # the hardware's stored counter (rollback protection)
        self.swaps = 0
        self.reverts = 0

    def validate(self, data: bytes) -> McubootImage:
        """MCUboot's checks of a slot's image: fits, verifies with the built-in key, no downgrade."""
        if self.key is None:
            raise BootRefusal("the bootloader was built without an image-signing key")
        if len(data) + self.trailer_bytes > self.slot_bytes:
            raise BootRefusal(
                f"image of {len(data)} bytes and the {self.trailer_bytes}-byte trailer exceed the "
                f"{self.slot_bytes}-byte slot"
            )
        try:
            image = verify_image(data, self.key)
        except McubootImageError as exc:
            raise BootRefusal(str(exc)) from None
        counter = image.security_counter or 0
        if counter < self.security_counter:
            raise BootRefusal(
                f"security counter {counter} is lower than the board's stored {self.security_counter}"
            )
        return image

    def write_secondary(self, data: bytes, *, permanent: bool) -> McubootImage:
        """Store an image in the secondary slot and mark it for the next boot (test or permanent)."""
        image = self.validate(data)
        self.secondary = SlotImage(data, image)
        self.swap = Swap.PERMANENT if permanent else Swap.TEST
        return image

    def boot(self) -> None:
        """What MCUboot does at reset: revert an unconfirmed test image, or swap a marked one in."""
        if not self.confirmed and self.swap is Swap.NONE:
            # The test image did not confirm itself: swap the previous image back.
            self.primary, self.secondary = self.secondary, self.primary
            self.confirmed = True
            self.reverts += 1
            return
        if self.swap is Swap.NONE or self.secondary is None:
            return
        marked, self.swap = self.swap, Swap.NONE
        try:
            self.validate(self.secondary.data)  # validated again at boot, as MCUboot does
        except BootRefusal:
            return  # an invalid secondary image is never swapped in
        self.primary, self.secondary = self.secondary, self.primary
        self.swaps += 1
        self.confirmed = marked is Swap.PERMANENT
        if self.confirmed:
            self._raise_counter()

    def confirm(self) -> None:
        """The running image marks itself good (SMP image state write, confirm)."""
        if not self.confirmed:
            self.confirmed = True
            self._raise_counter()

    def _raise_counter(self) -> None:
        if self.primary is not None:
            self.security_counter = max(self.security_counter, self.primary.image.security_counter or 0)

    def install(self, data: bytes) -> McubootImage:
        """Write, mark permanent and reboot into an image (the native protocol's FW_END)."""
        image = self.write_secondary(data, permanent=True)
        self.boot()
        return image
