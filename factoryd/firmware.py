"""A lot's firmware: an MCUboot image checked against the lot, then kept per lot on the station.

The customer gives the image (``imgtool sign`` output) and the firmware-signing *public* key; the
station never holds the private key. :func:`check_lot_image` runs every check of
``docs/firmware.md`` (:func:`factoryd.mcuboot.verify_lot_image`) plus the lot's own rules (its
signing key, its previous security counter, its slot). :func:`store_lot_firmware` stores the image
and records it in the lot profile; a refusal stores nothing.

On disk, one directory per image, named by its MCUboot hash (the SHA256 TLV, not the file hash)::

    <firmware_dir>/<lot>/<sha256>/image.bin        the file as uploaded (0600)
    <firmware_dir>/<lot>/<sha256>/signing-key.pem  the public key it verifies with
    <firmware_dir>/<lot>/signing-key.pem           a copy of the lot's current key, for tools
                                                   (``factoryd sim hub --firmware-key``)

A directory appears whole or not at all (staged, then renamed). The lot profile's
``firmware_sha256`` names the current one, so a crash between the store and the ledger leaves
an unused directory, never a half-updated lot. (The MCUboot hash does not cover the signature:
an image re-signed by a new key has the same hash, and replaces the stored one only once the
ledger recorded it.) Loading verifies the image again: a file changed on disk is refused, never
flashed.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from cryptography.hazmat.primitives import serialization

from factoryd.errors import FactorydError, FirmwareRejectedError, InputError
from factoryd.files import DIR_MODE, fsync_dir, write_new, write_private
from factoryd.mcuboot import (
    McubootImage,
    McubootImageError,
    SigningPublicKey,
    signing_key_hash,
    verify_image,
    verify_lot_image,
)

if TYPE_CHECKING:
    from factoryd.ledger import Ledger
    from factoryd.ledger.model import LotInfo
    from factoryd.ledger.profile import LotProfile

log = structlog.get_logger(__name__)

# The largest MCUboot slots on today's boards are a few MiB (Portenta H7: 0x1E0000); 16 MiB leaves
# room for external-flash slots and still keeps an upload in memory.
FIRMWARE_IMAGE_MAX_BYTES = 16 * 1024 * 1024
# A PEM public key is a few hundred bytes (RSA-3072: ~630).
SIGNING_KEY_MAX_BYTES = 16 * 1024
IMAGE_FILE = "image.bin"
KEY_FILE = "signing-key.pem"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# The ledger's rule for lot names: never a path.
_LOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, repr=False)
class LotFirmware:
    """A lot's stored MCUboot image, verified: the file, what the verifier read, the signing key."""

    data: bytes  # the file, as uploaded and as flashed
    image: McubootImage
    signing_key_pem: bytes

    @property
    def sha256(self) -> bytes:
        """The MCUboot image hash (SHA256 TLV): what the board reports once it runs the image."""
        return bytes.fromhex(self.image.hash)

    @property
    def version(self) -> str:
        """The image version, ``major.minor.revision+build``."""
        return self.image.version

    def __repr__(self) -> str:
        return f"LotFirmware(version={self.version!r}, sha256={self.image.hash[:12]}…)"


@dataclass(frozen=True)
class StagedImage:
    """A verified image written next to its place (``staging``), not yet where loads find it."""

    firmware: LotFirmware
    target: Path
    staging: Path | None  # None: this very file and key are stored already
    replaces: bool  # ``target`` holds another file or key under the same MCUboot hash


@dataclass(frozen=True)
class FirmwareUpload:
    """What a stored upload changed: the lot as recorded, the image and where it is kept."""

    lot: LotInfo
    firmware: LotFirmware
    path: Path
    signing_key_replaced: bool


def load_signing_key(pem: bytes) -> SigningPublicKey:
    """The firmware-signing public key from PEM; a private key or anything else is refused."""
    if len(pem) > SIGNING_KEY_MAX_BYTES:
        raise InputError(f"firmware-signing key is over {SIGNING_KEY_MAX_BYTES} bytes: not a PEM public key")
    if b"PRIVATE KEY-----" in pem:
        raise InputError(
            "the firmware-signing key given is a private key; the station takes only the public key "
            "(imgtool getpub -k KEY.pem -e pem)"
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise InputError(f"firmware-signing key is not a PEM public key: {exc}") from None
    if not isinstance(key, SigningPublicKey):
        raise InputError(f"firmware-signing key is a {type(key).__name__}, which MCUboot cannot use")
    return key


def _pem(key: SigningPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_lot_image(
    profile: LotProfile, data: bytes, signing_key: SigningPublicKey, *, replace_signing_key: bool = False
) -> McubootImage:
    """Every check before a lot takes an image (docs/firmware.md); refuse it naming the problem."""
    if len(data) > FIRMWARE_IMAGE_MAX_BYTES:
        raise McubootImageError(
            f"file is {len(data)} bytes, over the station's limit of {FIRMWARE_IMAGE_MAX_BYTES} bytes"
        )
    if profile.slot_size is None:
        raise InputError(
            "the lot profile has no slot_size: the station cannot check that the image fits the board's "
            'slot (create the lot with "slot_size": <bytes> in its profile)'
        )
    key_hash = signing_key_hash(signing_key)
    lot_key = profile.firmware_key_hash
    if lot_key is not None and lot_key != key_hash and not replace_signing_key:
        raise InputError(
            f"the signing key given (key hash {key_hash[:16]}…) is not the lot's firmware-signing key "
            f"(key hash {lot_key[:16]}…); an admin may replace the lot's key (--replace-signing-key)"
        )
    return verify_lot_image(
        data,
        signing_key,
        slot_size=profile.slot_size,
        previous_security_counter=profile.firmware_security_counter,
        trailer_bytes=profile.trailer_bytes(),
        key_format=profile.firmware_key_format,
    )


class FirmwareStore:
    """Per-lot MCUboot images on the station, one directory per image hash (see the module doc)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def image_dir(self, lot: str, sha256: str) -> Path:
        """Where the lot's image of this MCUboot hash is kept."""
        if not _LOT_NAME.fullmatch(lot):
            raise InputError(f"lot name {lot!r} cannot name a firmware directory")
        if not _SHA256_HEX.fullmatch(sha256):
            raise InputError(f"image hash {sha256!r} is not 64 lowercase hex digits")
        return self.directory / lot / sha256

    def stage(self, lot: str, data: bytes, signing_key: SigningPublicKey) -> StagedImage:
        """Write an image that verifies with ``signing_key`` to a hidden directory next to its place.

        Callers check the lot's policy first (:func:`check_lot_image`); this checks the image again
        as MCUboot does, so nothing unverifiable is ever written. Nothing is staged when the very
        same file and key are stored already.
        """
        image = verify_image(data, signing_key)
        target = self.image_dir(lot, image.hash)
        firmware = LotFirmware(data, image, _pem(signing_key))
        replaces = target.exists() or target.is_symlink()
        if replaces:
            try:
                existing = self.load(lot, image.hash)
            except FactorydError:
                existing = None  # damaged on disk: replaced
            if existing is not None and (existing.data, existing.signing_key_pem) == (
                data,
                firmware.signing_key_pem,
            ):
                return StagedImage(firmware, target, None, replaces=False)
        target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        os.mkdir(staging, DIR_MODE)
        try:
            os.chmod(staging, DIR_MODE)  # mkdir honours the umask
            write_new(staging / IMAGE_FILE, data)
            write_new(staging / KEY_FILE, firmware.signing_key_pem)
            fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return StagedImage(firmware, target, staging, replaces=replaces)

    def put(self, staged: StagedImage) -> bool:
        """Move a staged image into its place in one rename; False when there was nothing to move.

        An image that replaces another under the same hash (another key, other padding, a damaged
        copy) takes its place; the old one is removed afterwards.
        """
        if staged.staging is None:
            return False
        target = staged.target
        aside: Path | None = None
        if target.exists() or target.is_symlink():
            if not staged.replaces:  # a concurrent upload of the same image was faster
                self.drop(staged)
                return False
            aside = target.with_name(f".{target.name}.{secrets.token_hex(6)}.old")
            os.rename(target, aside)
        os.rename(staged.staging, target)
        fsync_dir(target.parent)
        if aside is not None:
            if aside.is_symlink():  # rmtree never follows one; nor should the store
                aside.unlink()
            else:
                shutil.rmtree(aside, ignore_errors=True)
        return True

    def drop(self, staged: StagedImage) -> None:
        """Remove a staged image that is not wanted after all."""
        if staged.staging is not None:
            shutil.rmtree(staged.staging, ignore_errors=True)

    def save(self, lot: str, data: bytes, signing_key: SigningPublicKey) -> LotFirmware:
        """Stage and put an image at once (for callers without a ledger record to wait for)."""
        staged = self.stage(lot, data, signing_key)
        self.put(staged)
        return staged.firmware

    def lot_key_path(self, lot: str) -> Path:
        """The copy of the lot's current firmware-signing key (the ledger's key hash is what counts)."""
        if not _LOT_NAME.fullmatch(lot):
            raise InputError(f"lot name {lot!r} cannot name a firmware directory")
        return self.directory / lot / KEY_FILE

    def discard(self, lot: str, sha256: str) -> None:
        """Remove a stored image (one the ledger did not take)."""
        target = self.image_dir(lot, sha256)
        shutil.rmtree(target, ignore_errors=True)
        if target.parent.is_dir():
            fsync_dir(target.parent)

    def load(self, lot: str, sha256: str) -> LotFirmware | None:
        """The lot's image of this hash, verified again; None when it is not stored."""
        folder = self.image_dir(lot, sha256)
        try:
            data = (folder / IMAGE_FILE).read_bytes()
            pem = (folder / KEY_FILE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            image = verify_image(data, load_signing_key(pem))
        except InputError as exc:
            raise FirmwareRejectedError(f"stored firmware {folder} no longer verifies: {exc}", 0) from None
        if image.hash != sha256:
            raise FirmwareRejectedError(
                f"stored firmware {folder} has MCUboot hash {image.hash[:12]}…, not its name", 0
            )
        return LotFirmware(data, image, pem)

    def load_current(self, lot: str, profile: LotProfile) -> LotFirmware | None:
        """The image the lot profile names (None when it names none), signed by the lot's key."""
        wanted = profile.firmware_sha256
        if wanted is None:
            return None
        firmware = self.load(lot, wanted)
        if (
            firmware is not None
            and profile.firmware_key_hash is not None
            and firmware.image.key_hash != profile.firmware_key_hash
        ):
            raise FirmwareRejectedError(
                f"stored firmware {self.image_dir(lot, wanted)} is signed by key "
                f"{firmware.image.key_hash[:16]}…, not the lot's {profile.firmware_key_hash[:16]}…",
                0,
            )
        return firmware


def store_lot_firmware(
    ledger: Ledger,
    store: FirmwareStore,
    lot: str,
    data: bytes,
    signing_key_pem: bytes,
    *,
    actor: str,
    replace_signing_key: bool = False,
) -> FirmwareUpload:
    """Verify an image for a lot, store it and make it the lot's firmware; refused whole otherwise.

    Blocking (verifies, writes files, commits): run it off the event loop.
    """
    info = ledger.get_lot(lot)
    key = load_signing_key(signing_key_pem)
    image = check_lot_image(info.profile, data, key, replace_signing_key=replace_signing_key)
    staged = store.stage(info.name, data, key)
    # A new image is in place before the ledger names it (a crash leaves an unused directory); one
    # replacing a stored image of the same hash takes its place only once the ledger took it.
    placed = not staged.replaces and store.put(staged)
    try:
        recorded = ledger.record_lot_firmware(
            info.name,
            sha256=image.hash,
            version=image.version,
            security_counter=image.security_counter,
            key_hash=image.key_hash,
            actor=actor,
            replace_signing_key=replace_signing_key,
        )
    except BaseException:
        if placed:
            store.discard(info.name, image.hash)
        store.drop(staged)
        raise
    if staged.replaces:
        store.put(staged)
    firmware = staged.firmware
    try:
        write_private(store.lot_key_path(info.name), firmware.signing_key_pem)
    except OSError as exc:
        # The image is recorded and stored; the copy only serves tools, so say so and go on.
        log.warning("cannot write the lot's signing key copy", lot=info.name, error=str(exc))
    replaced = info.profile.firmware_key_hash not in (None, image.key_hash)
    return FirmwareUpload(recorded, firmware, store.image_dir(info.name, image.hash), replaced)
