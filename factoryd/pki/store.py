"""Lot CA bundles at rest: key encrypted under the station passphrase, files 0600 in a 0700 directory."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from factoryd.errors import BundleError, ConfigError, SignerError
from factoryd.files import DIR_MODE, private_staging_dir, wipe, write_new
from factoryd.pki.bundle import CaBundle, pem_of
from factoryd.pki.passphrase import Secret
from factoryd.pki.signer import spki_der

log = structlog.get_logger(__name__)

KEY_FILE = "ca-key.pem"
CHAIN_FILE = "ca-chain.pem"
ANCHORS_FILE = "trust-anchors.pem"
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
        # A directory rename is atomic: readers see the whole bundle or none of it.
        with private_staging_dir(target) as staging:
            write_new(staging / KEY_FILE, key_pem)
            write_new(staging / CHAIN_FILE, pem_of(bundle.chain))
            write_new(staging / ANCHORS_FILE, pem_of(bundle.trust_anchors))
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
        with contextlib.suppress(FileNotFoundError):  # a token lot has no key file
            wipe(directory / KEY_FILE)
        shutil.rmtree(directory)
        log.info("ca_bundle_deleted", lot=lot)
