"""The arduino-v1 compressed certificate: the fields the provisioning sketch stores and rebuilds from.

Layout and date packing are described in ARDUINO_V1.md. ``arduino_reconstruct_certificate``
rebuilds the DER the way the sketch's template does, so tests (and the simulated board) can
prove an issued certificate survives the round trip byte for byte.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from factoryd.errors import IssuanceError
from factoryd.pki import der
from factoryd.pki.challenge import der_to_raw_signature
from factoryd.pki.profile import (
    ARDUINO_ISSUER,
    ARDUINO_MAX_ISSUE_YEAR,
    ARDUINO_MAX_VALIDITY_YEARS,
    ARDUINO_MIN_ISSUE_YEAR,
    arduino_subject,
)

SERIAL_BYTES = 16
AKI_BYTES = 20
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 64  # X||Y of a P-256 point, as the secure element returns it
# UTCTime covers 1950..2049 (RFC 5280 4.1.2.5); the sketch switches to GeneralizedTime after.
UTCTIME_LAST_YEAR = 2049

_ECDSA_SHA256 = der.encode(der.TAG_SEQUENCE, der.encode(der.TAG_OID, bytes.fromhex("2a8648ce3d040302")))
# AlgorithmIdentifier(ecPublicKey, prime256v1) and the BIT STRING header of an uncompressed point.
_P256_SPKI_BODY_PREFIX = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d03010703420004")
_AKI_OID = der.encode(der.TAG_OID, bytes.fromhex("551d23"))


@dataclass(frozen=True)
class ArduinoCertFields:
    """What the sketch needs to rebuild the certificate (SetCertSerial, SetAuthKey, SetSignature, dates)."""

    serial16: bytes
    aki20: bytes
    signature64: bytes
    year: int
    month: int
    day: int
    hour: int
    years: int

    @property
    def packed_dates(self) -> bytes:
        """The 3 bytes stored after the signature in slot 10."""
        return arduino_pack_dates(self.year, self.month, self.day, self.hour, self.years)


def arduino_pack_dates(year: int, month: int, day: int, hour: int, years: int) -> bytes:
    """Pack issue date and validity years into the sketch's 3-byte format."""
    if not ARDUINO_MIN_ISSUE_YEAR <= year <= ARDUINO_MAX_ISSUE_YEAR:
        raise ValueError(f"year {year} outside {ARDUINO_MIN_ISSUE_YEAR}..{ARDUINO_MAX_ISSUE_YEAR}")
    if not 1 <= month <= 12 or not 1 <= day <= 31 or not 0 <= hour <= 23:
        raise ValueError(f"invalid date {year}-{month}-{day} {hour}h")
    if not 0 <= years <= ARDUINO_MAX_VALIDITY_YEARS:
        raise ValueError(f"validity years {years} outside 0..{ARDUINO_MAX_VALIDITY_YEARS}")
    b0 = (year - 2000) << 3 | month >> 1
    b1 = (month & 1) << 7 | day << 2 | hour >> 3
    b2 = (hour & 7) << 5 | years
    return bytes([b0, b1, b2])


def arduino_unpack_dates(packed: bytes) -> tuple[int, int, int, int, int]:
    """Inverse of ``arduino_pack_dates``: (year, month, day, hour, years)."""
    if len(packed) != 3:
        raise ValueError(f"packed dates are 3 bytes, got {len(packed)}")
    b0, b1, b2 = packed
    return (b0 >> 3) + 2000, (b0 & 7) << 1 | b1 >> 7, (b1 & 0x7C) >> 2, (b1 & 3) << 3 | b2 >> 5, b2 & 0x1F


def arduino_compressed_fields(cert: x509.Certificate) -> ArduinoCertFields:
    """Extract the compressed fields from an arduino-v1 certificate, refusing one the board cannot hold."""
    if cert.issuer.public_bytes() != ARDUINO_ISSUER.public_bytes():
        raise IssuanceError("not an arduino-v1 certificate: issuer is not the Arduino template name")
    if not isinstance(cert.signature_hash_algorithm, hashes.SHA256) or not isinstance(
        cert.public_key(), ec.EllipticCurvePublicKey
    ):
        raise IssuanceError("not an arduino-v1 certificate: ECDSA P-256 with SHA-256 required")
    extensions = list(cert.extensions)
    if len(extensions) != 1 or not isinstance(extensions[0].value, x509.AuthorityKeyIdentifier):
        raise IssuanceError("not an arduino-v1 certificate: the only extension must be the AKI")
    aki = extensions[0].value
    if aki.key_identifier is None or len(aki.key_identifier) != AKI_BYTES or aki.authority_cert_issuer:
        raise IssuanceError(f"not an arduino-v1 certificate: AKI must be a {AKI_BYTES}-byte key identifier")
    if not 0 < cert.serial_number < 1 << (8 * SERIAL_BYTES):
        raise IssuanceError("not an arduino-v1 certificate: serial does not fit in 16 bytes")
    start = cert.not_valid_before_utc
    end = cert.not_valid_after_utc
    years = end.year - start.year
    if start.minute or start.second or end != _add_years(start, years) or not 1 <= years <= 31:
        raise IssuanceError(
            "not an arduino-v1 certificate: validity must start on the hour and last N whole years"
        )
    return ArduinoCertFields(
        serial16=cert.serial_number.to_bytes(SERIAL_BYTES, "big"),
        aki20=aki.key_identifier,
        signature64=der_to_raw_signature(cert.signature),
        year=start.year,
        month=start.month,
        day=start.day,
        hour=start.hour,
        years=years,
    )


def arduino_template_fields(cert: x509.Certificate, device_id: str) -> ArduinoCertFields:
    """The fields the sketch stores, refusing a certificate its template would not rebuild byte for byte.

    The arduino-v1 certificate rule of both the station (before anything is written to the board)
    and the line's signer (before the certificate is recorded): what the board will present is
    exactly the certificate the CA signed.
    """
    fields = arduino_compressed_fields(cert)
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IssuanceError("not an arduino-v1 certificate: ECDSA P-256 required")
    rebuilt = arduino_reconstruct_certificate(fields, device_id, public_key_raw64(key))
    if rebuilt != cert.public_bytes(serialization.Encoding.DER):
        raise IssuanceError(
            f"the arduino-v1 certificate for {device_id} is not what the sketch's template rebuilds "
            "from its stored fields: the board would present another certificate"
        )
    return fields


def _add_years(start: dt.datetime, years: int) -> dt.datetime | None:
    try:
        return start.replace(year=start.year + years)
    except ValueError:
        return None


def _time(year: int, month: int, day: int, hour: int) -> bytes:
    if year > UTCTIME_LAST_YEAR:
        return der.encode(der.TAG_GENERALIZED_TIME, f"{year:04d}{month:02d}{day:02d}{hour:02d}0000Z".encode())
    return der.encode(der.TAG_UTC_TIME, f"{year % 100:02d}{month:02d}{day:02d}{hour:02d}0000Z".encode())


def arduino_reconstruct_certificate(fields: ArduinoCertFields, device_id: str, public_key64: bytes) -> bytes:
    """Rebuild the certificate DER from the stored fields, as the sketch's template does."""
    if len(public_key64) != PUBLIC_KEY_BYTES:
        raise ValueError(f"public key must be {PUBLIC_KEY_BYTES} bytes (X||Y)")
    serial = der.encode_integer(int.from_bytes(fields.serial16, "big"))
    validity = der.encode(
        der.TAG_SEQUENCE,
        _time(fields.year, fields.month, fields.day, fields.hour)
        + _time(fields.year + fields.years, fields.month, fields.day, fields.hour),
    )
    if any(fields.aki20):
        aki_value = der.encode(der.TAG_SEQUENCE, der.encode(0x80, fields.aki20))
        extension = der.encode(der.TAG_SEQUENCE, _AKI_OID + der.encode(der.TAG_OCTET_STRING, aki_value))
        extensions = der.encode(0xA3, der.encode(der.TAG_SEQUENCE, extension))
    else:
        extensions = bytes.fromhex("a3023000")
    tbs = der.encode(
        der.TAG_SEQUENCE,
        bytes.fromhex("a003020102")
        + serial
        + _ECDSA_SHA256
        + ARDUINO_ISSUER.public_bytes()
        + validity
        + arduino_subject(device_id).public_bytes()
        + der.encode(der.TAG_SEQUENCE, _P256_SPKI_BODY_PREFIX + public_key64)
        + extensions,
    )
    r = int.from_bytes(fields.signature64[:32], "big")
    s = int.from_bytes(fields.signature64[32:], "big")
    signature = der.encode(der.TAG_BIT_STRING, b"\x00" + encode_dss_signature(r, s))
    return der.encode(der.TAG_SEQUENCE, tbs + _ECDSA_SHA256 + signature)


def public_key_raw64(key: ec.EllipticCurvePublicKey) -> bytes:
    """X||Y of a P-256 public key (the secure element's format)."""
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return point[1:]
