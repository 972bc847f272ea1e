"""Lot CA bundles at rest: key encrypted under the station passphrase, files 0600 in a 0700 directory."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from factoryd.errors import BundleError, ConfigError, SignerError
from factoryd.pki.bundle import CaBundle, pem_of
from factoryd.pki.passphrase import Secret
from factoryd.pki.signer import spki_der

log = structlog.get_logger(__name__)

KEY_FILE = "ca-key.pem"
CHAIN_FILE = "ca-chain.pem"
ANCHORS_FILE = "trust-anchors.pem"
FILE_MODE = 0o600
DIR_MODE = 0o700
# Lot names become directory names: keep them to a safe, portable alphabet.
LOT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class BundleStore:
    """Saves and loads each lot's CA bundle under ``directory/<lot>/``."""

    def __init__(self, directory: str | os.PathLike[str], passphrase: bytes) -> None:
        if not passphrase:
            raise ConfigError("the station passphrase is empty")
        self._dir = Path(directory)
        self._passphrase = Secret(passphrase)
        self._dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # mkdir honours the umask and leaves an existing directory alone; the CA keys need 0700.
        os.chmod(self._dir, DIR_MODE)

    def __repr__(self) -> str:
        return f"BundleStore(directory={str(self._dir)!r})"

    @property
    def directory(self) -> Path:
        """Where the lot directories live."""
        return self._dir

    def path(self, lot: str) -> Path:
        """The directory of ``lot``'s bundle."""
        if not LOT_NAME_RE.fullmatch(lot):
            raise BundleError(f"invalid lot name {lot!r} (letters, digits, '.', '_', '-'; up to 128)")
        return self._dir / lot

    def exists(self, lot: str) -> bool:
        """True when ``lot`` has a saved bundle."""
        return self.path(lot).is_dir()

    def save(self, lot: str, bundle: CaBundle) -> Path:
        """Store ``bundle`` for ``lot`` atomically; refuses if the lot already has one."""
        target = self.path(lot)
        if target.exists():
            raise BundleError(f"lot {lot!r} already has a CA bundle; delete it first to replace it")
        key_pem = bundle.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(bytes(self._passphrase)),
        )
        staging = self._dir / f".{lot}.tmp-{secrets.token_hex(4)}"
        os.mkdir(staging, DIR_MODE)
        try:
            os.chmod(staging, DIR_MODE)
            _write_new(staging / KEY_FILE, key_pem)
            _write_new(staging / CHAIN_FILE, pem_of(bundle.chain))
            _write_new(staging / ANCHORS_FILE, pem_of(bundle.trust_anchors))
            _fsync_dir(staging)
            # A directory rename is atomic: readers see the whole bundle or none of it.
            os.rename(staging, target)
            _fsync_dir(self._dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("ca_bundle_saved", lot=lot, ca_subject=bundle.certificate.subject.rfc4514_string())
        return target

    def load(self, lot: str) -> CaBundle:
        """Load ``lot``'s bundle, decrypting the key with the station passphrase."""
        directory = self.path(lot)
        if not directory.is_dir():
            raise BundleError(f"lot {lot!r} has no CA bundle")
        try:
            key_pem = (directory / KEY_FILE).read_bytes()
        except FileNotFoundError:
            raise BundleError(
                f"lot {lot!r} has no CA key file (was it moved into a PKCS#11 token? see docs/pkcs11.md)"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_pem, bytes(self._passphrase))
        except (ValueError, TypeError):
            raise SignerError(f"the station passphrase does not decrypt the CA key of lot {lot!r}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise SignerError(f"the stored CA key of lot {lot!r} has an unsupported type")
        try:
            chain = tuple(x509.load_pem_x509_certificates((directory / CHAIN_FILE).read_bytes()))
            anchors_pem = (directory / ANCHORS_FILE).read_bytes()
            anchors = tuple(x509.load_pem_x509_certificates(anchors_pem)) if anchors_pem.strip() else ()
        except ValueError as exc:
            raise BundleError(f"stored bundle of lot {lot!r} is corrupt: {exc}") from None
        if not chain or spki_der(chain[0]) != spki_der(key.public_key()):
            raise SignerError(f"the stored CA key of lot {lot!r} does not match its certificate")
        return CaBundle(chain[0], key, chain, anchors)

    def delete(self, lot: str) -> None:
        """Remove ``lot``'s bundle (the key file is overwritten first)."""
        directory = self.path(lot)
        if not directory.is_dir():
            raise BundleError(f"lot {lot!r} has no CA bundle")
        key_file = directory / KEY_FILE
        with contextlib.suppress(FileNotFoundError), open(key_file, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(0)
            handle.write(b"\0" * size)
            handle.flush()
            os.fsync(handle.fileno())
        shutil.rmtree(directory)
        log.info("ca_bundle_deleted", lot=lot)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
