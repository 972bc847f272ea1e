"""Device certificate profiles: what a lot's device certificates look like."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal, get_args

from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from factoryd.errors import ConfigError, IssuanceError
from factoryd.matter.dac import NO_EXPIRY, DacSpec
from factoryd.pki.template import DEFAULT_TEMPLATE, SubjectTemplate

ProfileKind = Literal["factoryd-v1", "arduino-v1"]
PROFILE_KINDS: tuple[str, ...] = get_args(ProfileKind)

DEFAULT_CERT_VALIDITY_DAYS = 3650
# Covers clock skew between station and the servers that later check the certificate.
DEFAULT_BACKDATE_S = 300
# arduino-v1: expiry years live in 5 bits of the packed dates (ARDUINO_V1.md).
ARDUINO_MAX_VALIDITY_YEARS = 31
# arduino-v1: the issue year lives in 5 bits counting from 2000.
ARDUINO_MAX_ISSUE_YEAR = 2031
ARDUINO_MIN_ISSUE_YEAR = 2000
ARDUINO_TEMPLATE_REFUSAL = (
    "arduino-v1 certificates have a fixed subject (CN=<device ID>) and no SANs: the sketch rebuilds "
    "the certificate from its own template, so a subject template or SANs cannot be used with it"
)


def _printable(oid: x509.ObjectIdentifier, value: str) -> x509.NameAttribute[str]:
    # The Arduino sketch rebuilds names as PrintableString; the bytes must match what we sign.
    return x509.NameAttribute(oid, value, _type=_ASN1Type.PrintableString)


# The fixed issuer of the sketch's certificate template, encoded exactly as the board rebuilds it.
ARDUINO_ISSUER = x509.Name(
    [
        x509.RelativeDistinguishedName([_printable(NameOID.COUNTRY_NAME, "US")]),
        x509.RelativeDistinguishedName([_printable(NameOID.ORGANIZATION_NAME, "Arduino LLC US")]),
        x509.RelativeDistinguishedName([_printable(NameOID.ORGANIZATIONAL_UNIT_NAME, "IT")]),
        x509.RelativeDistinguishedName([_printable(NameOID.COMMON_NAME, "Arduino")]),
    ]
)


def arduino_subject(device_id: str) -> x509.Name:
    """The subject the sketch rebuilds: CN=device_id as PrintableString."""
    return x509.Name([_printable(NameOID.COMMON_NAME, device_id)])


@dataclass(frozen=True)
class CertProfile:
    """How device certificates of a lot are shaped (``kind``) and how long they live."""

    kind: ProfileKind = "factoryd-v1"
    cert_validity_days: int = DEFAULT_CERT_VALIDITY_DAYS  # factoryd-v1
    backdate_s: int = DEFAULT_BACKDATE_S
    validity_years: int = ARDUINO_MAX_VALIDITY_YEARS  # arduino-v1
    allowed_csr_extensions: frozenset[x509.ObjectIdentifier] = field(default_factory=frozenset)
    # The device certificate's subject and SANs (factoryd-v1; arduino-v1 takes only the default).
    subject: SubjectTemplate = DEFAULT_TEMPLATE
    # A Matter lot (factoryd-v1 kind only): issue DACs, the Matter VID/PID subject attributes and
    # the DAC profile's extensions (factoryd/matter/dac.py, docs/matter.md).
    dac: DacSpec | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROFILE_KINDS:
            raise ConfigError(
                f"unknown certificate profile {self.kind!r} (known: {', '.join(PROFILE_KINDS)})"
            )
        if self.kind == "arduino-v1" and not self.subject.is_default:
            raise ConfigError(ARDUINO_TEMPLATE_REFUSAL)
        if self.kind == "arduino-v1" and self.dac is not None:
            raise ConfigError("arduino-v1 certificates cannot be Matter DACs")
        if self.cert_validity_days < 1:
            raise ConfigError(f"cert_validity_days must be >= 1, got {self.cert_validity_days}")
        if not 0 <= self.backdate_s <= 86400:
            raise ConfigError(f"backdate_s must be within 0..86400, got {self.backdate_s}")
        if not 1 <= self.validity_years <= ARDUINO_MAX_VALIDITY_YEARS:
            raise ConfigError(
                f"validity_years must be within 1..{ARDUINO_MAX_VALIDITY_YEARS}, got {self.validity_years}"
            )

    def validity_window(self, now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
        """(notBefore, notAfter) for a certificate issued at ``now``."""
        now = _utc(now)
        start = now - dt.timedelta(seconds=self.backdate_s)
        if self.kind == "factoryd-v1":
            if self.dac is not None and self.dac.no_expiry:
                return start.replace(microsecond=0), NO_EXPIRY
            return start.replace(microsecond=0), (now + dt.timedelta(days=self.cert_validity_days)).replace(
                microsecond=0
            )
        start = start.replace(minute=0, second=0, microsecond=0)
        if not ARDUINO_MIN_ISSUE_YEAR <= start.year <= ARDUINO_MAX_ISSUE_YEAR:
            raise IssuanceError(
                f"arduino-v1 certificates cannot start in {start.year} "
                f"(the board stores years {ARDUINO_MIN_ISSUE_YEAR}..{ARDUINO_MAX_ISSUE_YEAR})"
            )
        end_year = start.year + self.validity_years
        if start.month == 2 and start.day == 29 and not _is_leap(end_year):
            # The board rebuilds notAfter as the same month/day N years on; Feb 29 would not exist.
            start = start.replace(day=28, hour=23)
        return start, start.replace(year=end_year)


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(dt.UTC)


def utc_now(now: dt.datetime | None = None) -> dt.datetime:
    """``now`` in UTC (or the current time); naive datetimes are refused."""
    return _utc(now)
