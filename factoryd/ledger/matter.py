"""Matter onboarding codes in the ledger, sealed: the QR payload and manual code hold the passcode.

Each Matter device's codes are stored as AES-256-GCM ciphertext (nonce || ciphertext || tag, the
lot and device ID as associated data) under a key derived with scrypt from the **station secret**
(the passphrase that already protects the lot's CA key: a systemd credential, never in the
config) and a random per-lot salt kept in ``matter_lot``. The database alone, its files, its
backups and a PostgreSQL server's operator never see a passcode; a ledger opened without the
secret can still provision non-Matter lots and list what exists, but cannot seal or open codes.
The derived key is cached per lot for the life of the ledger object (one scrypt per lot).
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from sqlmodel import Session, col, select

from factoryd.errors import InputError, LedgerError
from factoryd.ledger.engine import utc_now
from factoryd.ledger.lots import LotBook
from factoryd.ledger.model import DeviceState
from factoryd.ledger.tables import DeviceRow, MatterDeviceRow, MatterLotRow
from factoryd.matter.payload import OnboardingCodes

KDF_SALT_BYTES = 16
NONCE_BYTES = 12
KEY_BYTES = 32
# scrypt cost: 2^15 x 8 x 1 is the interactive-login setting of the scrypt paper (about 32 MiB, tens
# of ms) and runs once per lot per ledger object; the secret may be a human passphrase.
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
_AAD_PREFIX = b"factoryd onboarding codes v1\x00"
# Two stations creating a lot's salt at once lose a unique-key race at most once each.
SALT_RACE_RETRIES = 3


class _Secret(bytes):
    """The station secret: bytes that never print themselves (pki.passphrase.Secret; pki imports ledger)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class OnboardingSecretMissingError(LedgerError):
    """The ledger was opened without the station secret, so it cannot seal or open onboarding codes."""


@dataclass(frozen=True, slots=True)
class OnboardingRecord:
    """One provisioned Matter device as the customer's onboarding-codes file lists it."""

    device_id: str
    hw_serial: str
    discriminator: int
    product_id: int
    codes: OnboardingCodes

    def __repr__(self) -> str:
        return f"OnboardingRecord(device_id={self.device_id!r}, hw_serial={self.hw_serial!r}, codes=***)"


class _SaltRaceError(Exception):
    """Another transaction created the lot's salt first; read it instead."""


def _aad(lot: str, device_id: str) -> bytes:
    return _AAD_PREFIX + lot.encode() + b"\x00" + device_id.encode()


def _encode(codes: OnboardingCodes) -> bytes:
    return json.dumps({"manual": codes.manual_code, "qr": codes.qr_payload}, sort_keys=True).encode()


def _decode(plain: bytes) -> OnboardingCodes:
    data = json.loads(plain)
    return OnboardingCodes(qr_payload=str(data["qr"]), manual_code=str(data["manual"]))


class MatterBook(LotBook):
    """The ledger's sealed Matter onboarding codes (mixed into ``Ledger``)."""

    _onboarding_secret: _Secret | None = None
    _matter_salts: dict[str, tuple[int, bytes]] | None = None  # lot -> (lot id, KDF salt), made lazily
    _onboarding_keys: dict[int, AESGCM]
    _onboarding_lock: threading.Lock

    def use_onboarding_secret(self, secret: bytes) -> None:
        """Set the station secret the onboarding codes are sealed under (the CA passphrase)."""
        if not secret:
            raise InputError("the onboarding secret is empty")
        if self._onboarding_secret is not None and bytes(self._onboarding_secret) == bytes(secret):
            return  # the same secret again (a service call on the daemon's ledger): keep the cache
        self._onboarding_lock = threading.Lock()
        self._onboarding_keys = {}
        self._onboarding_secret = _Secret(secret)

    def _aead(self, lot_id: int, salt: bytes) -> AESGCM:
        secret = self._onboarding_secret
        if secret is None:
            raise OnboardingSecretMissingError(
                "the ledger was opened without the station secret: Matter onboarding codes cannot be "
                "sealed or read (open it with onboarding_secret = the CA passphrase)"
            )
        with self._onboarding_lock:
            aead = self._onboarding_keys.get(lot_id)
            if aead is None:
                kdf = Scrypt(salt=salt, length=KEY_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
                aead = self._onboarding_keys[lot_id] = AESGCM(kdf.derive(bytes(secret)))
            return aead

    def _matter_lot(self, lot: str) -> tuple[int, bytes]:
        """The Matter lot's id and KDF salt (created on first use); InputError for a non-Matter lot."""
        # A lot's salt never changes once made: one write transaction per lot, not per board.
        if self._matter_salts is None:
            self._matter_salts = {}
        cache = self._matter_salts
        found = cache.get(lot)
        if found is not None:
            return found
        for _ in range(SALT_RACE_RETRIES):
            try:
                found = cache[lot] = self._matter_lot_once(lot)
            except _SaltRaceError:
                continue
            return found
        raise LedgerError(f"could not create the onboarding salt of lot {lot!r}: lost every race")

    def _matter_lot_once(self, lot: str) -> tuple[int, bytes]:
        with self._transaction(write=True, on_integrity=lambda _exc: _SaltRaceError()) as session:
            row = self._lot_row(session, lot)
            if row.id is None:
                raise LedgerError(f"lot {lot!r} has no id")
            if not row.profile.get("matter"):
                raise InputError(f"lot {lot!r} is not a Matter lot")
            found = session.get(MatterLotRow, row.id)
            if found is not None:
                return row.id, found.kdf_salt
            salt = secrets.token_bytes(KDF_SALT_BYTES)
            session.add(MatterLotRow(lot_id=row.id, kdf_salt=salt, created_at=utc_now()))
            session.flush()
            return row.id, salt

    def record_onboarding_codes(
        self, lot: str, device_id: str, codes: OnboardingCodes, *, discriminator: int, product_id: int
    ) -> None:
        """Seal and store a reserved device's codes (a retry replaces them), before the board's verifier."""
        lot_id, salt = self._matter_lot(lot)
        aead = self._aead(lot_id, salt)
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = nonce + aead.encrypt(nonce, _encode(codes), _aad(lot, device_id))
        with self._transaction(write=True) as session:
            device = session.exec(
                select(DeviceRow).where(DeviceRow.lot_id == lot_id, DeviceRow.device_id == device_id)
            ).first()
            if device is None:
                raise InputError(f"lot {lot!r} has no device ID {device_id!r}")
            if device.state != DeviceState.RESERVED.value:
                raise InputError(
                    f"device {device_id!r} is {device.state}: codes are recorded while it is reserved"
                )
            row = session.exec(
                select(MatterDeviceRow).where(
                    MatterDeviceRow.lot_id == lot_id, MatterDeviceRow.device_id == device_id
                )
            ).first()
            now = utc_now()
            if row is None:
                row = MatterDeviceRow(
                    lot_id=lot_id,
                    device_id=device_id,
                    sealed_codes=sealed,
                    discriminator=discriminator,
                    product_id=product_id,
                    updated_at=now,
                )
            else:
                row.sealed_codes, row.discriminator, row.product_id = sealed, discriminator, product_id
                row.updated_at = now
            session.add(row)

    def _open_sealed(self, lot: str, lot_id: int, salt: bytes, row: MatterDeviceRow) -> OnboardingCodes:
        aead = self._aead(lot_id, salt)
        sealed = row.sealed_codes
        try:
            plain = aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _aad(lot, row.device_id))
        except InvalidTag:
            raise LedgerError(
                f"the onboarding codes of {row.device_id!r} do not open with this station's secret "
                "(another passphrase, or the row was altered)"
            ) from None
        return _decode(plain)

    def _is_matter_lot(self, session: Session, lot: str) -> bool:
        return bool(self._lot_row(session, lot).profile.get("matter"))

    def onboarding_codes(self, lot: str, device_id: str) -> OnboardingCodes | None:
        """The decrypted codes of a provisioned Matter device; None for a non-Matter lot.

        InputError when the lot is a Matter lot and the device is not provisioned (or has no codes).
        """
        with self._transaction(write=False) as session:
            if not self._is_matter_lot(session, lot):
                return None
        lot_id, salt = self._matter_lot(lot)
        with self._transaction(write=False) as session:
            device = session.exec(
                select(DeviceRow).where(DeviceRow.lot_id == lot_id, DeviceRow.device_id == device_id)
            ).first()
            if device is None or device.state != DeviceState.PROVISIONED.value:
                state = "absent" if device is None else device.state
                raise InputError(f"device {device_id!r} of lot {lot!r} is not provisioned ({state})")
            row = session.exec(
                select(MatterDeviceRow).where(
                    MatterDeviceRow.lot_id == lot_id, MatterDeviceRow.device_id == device_id
                )
            ).first()
            if row is None:
                raise InputError(f"device {device_id!r} of lot {lot!r} has no onboarding codes")
        return self._open_sealed(lot, lot_id, salt, row)

    def onboarding_records(self, lot: str) -> list[OnboardingRecord]:
        """Every provisioned device of a Matter lot with its decrypted codes, in provisioning order."""
        lot_id, salt = self._matter_lot(lot)
        with self._transaction(write=False) as session:
            pairs = session.exec(
                select(DeviceRow, MatterDeviceRow)
                .join(
                    MatterDeviceRow,
                    (col(MatterDeviceRow.lot_id) == col(DeviceRow.lot_id))
                    & (col(MatterDeviceRow.device_id) == col(DeviceRow.device_id)),
                )
                .where(DeviceRow.lot_id == lot_id, DeviceRow.state == DeviceState.PROVISIONED.value)
                .order_by(col(DeviceRow.provisioned_at), col(DeviceRow.id))
            ).all()
        return [
            OnboardingRecord(
                device_id=device.device_id,
                hw_serial=device.hw_serial or "",
                discriminator=matter.discriminator,
                product_id=matter.product_id,
                codes=self._open_sealed(lot, lot_id, salt, matter),
            )
            for device, matter in pairs
        ]

    def is_matter_lot(self, lot: str) -> bool:
        """True when ``lot``'s profile has a ``matter`` section."""
        with self._transaction(write=False) as session:
            return self._is_matter_lot(session, lot)
