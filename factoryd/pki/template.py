"""Subject and SAN templates of device certificates: parsed and checked once per lot, rendered per device.

A subject template lists attributes most significant first, as ``openssl -subj`` and the DER
order do (``"C=DE, O={org}, CN={id}"``); note that RFC 4514 strings (``rfc4514_string()``) print
them the other way round. Placeholders: ``{id}`` (the device ID), ``{NAME}`` (a lot constant from
``fields``) and ``{meta.COLUMN}`` (a per-device extra column of the customer's ID list). The
template is checked at lot creation (attribute types, placeholders, characters, RFC 5280 upper
bounds as far as they are known then); every rendered value is checked again before signing.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from factoryd.errors import ConfigError, IssuanceError

DEFAULT_SUBJECT = "CN={id}"
ID_FIELD = "id"
META_PREFIX = "meta."
# Attribute types of the RFC 5280 / AWS IoT JITP set (AWS::IoT::Certificate::* parameters, plus L).
# name -> (OID, RFC 5280 Appendix A upper bound in characters, encoding, may repeat).
_PRINTABLE = _ASN1Type.PrintableString
_UTF8 = _ASN1Type.UTF8String


@dataclass(frozen=True)
class _AttributeType:
    name: str
    oid: x509.ObjectIdentifier
    max_chars: int
    asn1_type: _ASN1Type
    repeatable: bool = False
    min_chars: int = 1


_ATTRIBUTE_TYPES = (
    # countryName is PrintableString SIZE(2): an ISO 3166 alpha-2 code.
    _AttributeType("C", NameOID.COUNTRY_NAME, 2, _PRINTABLE, min_chars=2),
    _AttributeType("ST", NameOID.STATE_OR_PROVINCE_NAME, 128, _UTF8),  # ub-state-name
    _AttributeType("L", NameOID.LOCALITY_NAME, 128, _UTF8),  # ub-locality-name
    _AttributeType("O", NameOID.ORGANIZATION_NAME, 64, _UTF8),  # ub-organization-name
    _AttributeType(
        "OU", NameOID.ORGANIZATIONAL_UNIT_NAME, 64, _UTF8, repeatable=True
    ),  # ub-organizational-unit-name
    _AttributeType("CN", NameOID.COMMON_NAME, 64, _UTF8),  # ub-common-name
    _AttributeType("serialNumber", NameOID.SERIAL_NUMBER, 64, _PRINTABLE),  # ub-serial-number
    # RFC 5280 gives dnQualifier no upper bound; 64 keeps it within what every consumer takes.
    _AttributeType("dnQualifier", NameOID.DN_QUALIFIER, 64, _PRINTABLE),
)
_TYPES_BY_KEY = {t.name.lower(): t for t in _ATTRIBUTE_TYPES}
KNOWN_ATTRIBUTES = tuple(t.name for t in _ATTRIBUTE_TYPES)

# Values may not hold what DN string forms and cloud parsers split on (RFC 4514 specials: , + = ; " \ < > #)
# nor control characters; a template's own text follows the same rule.
_DN_SPECIALS = frozenset(',+=;"\\<>#')
_PRINTABLE_STRING = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*")
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]{0,31}")
_META_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,63}")
# RFC 3986 characters (unreserved, reserved, percent) minus what cannot appear unescaped.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
MAX_DNS_NAME_CHARS = 253
# A URI SAN of several kilobytes is a mistake, not an identity.
MAX_URI_CHARS = 1024
MAX_SANS = 8
# A UUID device ID (the default id_format) is exactly this long; other formats are checked per device.
UUID_CHARS = 36


@dataclass(frozen=True)
class _Piece:
    """A literal text piece, or a placeholder (``field`` set)."""

    text: str
    field: str | None = None


@dataclass(frozen=True)
class _Value:
    pieces: tuple[_Piece, ...]

    @property
    def placeholders(self) -> set[str]:
        return {p.field for p in self.pieces if p.field is not None}


@dataclass(frozen=True)
class RenderedIdentity:
    """A device's subject and SANs, every value checked."""

    subject: x509.Name
    common_name: str
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]

    def san(self) -> x509.SubjectAlternativeName | None:
        """The subjectAltName extension, or None when the template has no SANs."""
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in self.uris]
        names += [x509.DNSName(d) for d in self.dns_names]
        return x509.SubjectAlternativeName(names) if names else None


def _parse_value(text: str, where: str) -> _Value:
    pieces: list[_Piece] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(
            f"{where}: {exc} (placeholders look like {{id}}, {{org}} or {{meta.column}})"
        ) from None
    for literal, field, spec, conversion in parsed:
        if literal:
            if "{" in literal or "}" in literal:
                raise ConfigError(f"{where}: literal braces are not allowed")
            pieces.append(_Piece(literal))
        if field is None:
            continue
        if spec or conversion:
            raise ConfigError(f"{where}: placeholder {{{field}}} may not carry a format spec or conversion")
        if field != ID_FIELD and not field.startswith(META_PREFIX) and not _FIELD_NAME.fullmatch(field):
            raise ConfigError(f"{where}: {{{field}}} is not a placeholder name")
        if field.startswith(META_PREFIX) and not _META_NAME.fullmatch(field.removeprefix(META_PREFIX)):
            raise ConfigError(f"{where}: {{{field}}} does not name an ID-list column")
        pieces.append(_Piece("", field))
    return _Value(tuple(pieces))


def _value_problem(value: str, *, printable_string: bool) -> str | None:
    """Why a rendered attribute value cannot go into a certificate subject, or None."""
    if not value:
        return "is empty"
    if any(not ch.isprintable() for ch in value):
        return "contains control characters"
    bad = sorted({ch for ch in value if ch in _DN_SPECIALS})
    if bad:
        return f"contains {' '.join(repr(ch) for ch in bad)} (not allowed in a subject value)"
    if value != value.strip():
        return "has leading or trailing spaces"
    if printable_string and not _PRINTABLE_STRING.fullmatch(value):
        return "has characters outside PrintableString (A-Z a-z 0-9 space ' ( ) + - . / : ?)"
    return None


@dataclass(frozen=True)
class _Attribute:
    kind: _AttributeType
    value: _Value


@dataclass(frozen=True)
class SubjectTemplate:
    """A lot's parsed subject and SAN templates and its constants; build with :meth:`parse`."""

    source: str
    attributes: tuple[_Attribute, ...]
    fields: tuple[tuple[str, str], ...]
    uris: tuple[_Value, ...]
    dns_names: tuple[_Value, ...]

    @classmethod
    def parse(
        cls,
        subject: str = DEFAULT_SUBJECT,
        *,
        fields: Mapping[str, str] | None = None,
        san_uris: Sequence[str] = (),
        san_dns: Sequence[str] = (),
        id_chars: int | None = None,
    ) -> SubjectTemplate:
        """Parse and check a template; ConfigError naming the problem. ``id_chars``: known ID length."""
        constants = dict(fields or {})
        for name, value in constants.items():
            if name in (ID_FIELD, "meta") or not _FIELD_NAME.fullmatch(name):
                raise ConfigError(
                    f"subject_fields: {name!r} is not a field name (lowercase letters, digits, _; "
                    "not 'id' or 'meta')"
                )
            if not isinstance(value, str):
                raise ConfigError(f"subject_fields.{name}: must be a string")
        attributes = [cls._parse_attribute(part, index) for index, part in enumerate(subject.split(","), 1)]
        names = [a.kind.name for a in attributes]
        for kind in _ATTRIBUTE_TYPES:
            if names.count(kind.name) > 1 and not kind.repeatable:
                raise ConfigError(f"subject template {subject!r}: {kind.name} appears more than once")
        common_names = [a for a in attributes if a.kind.oid == NameOID.COMMON_NAME]
        if len(common_names) != 1 or ID_FIELD not in common_names[0].value.placeholders:
            raise ConfigError(f"subject template {subject!r}: needs exactly one CN, containing {{id}}")
        if len(san_uris) + len(san_dns) > MAX_SANS:
            raise ConfigError(f"at most {MAX_SANS} SAN templates, got {len(san_uris) + len(san_dns)}")
        uris = tuple(_parse_value(u, f"san_uris {u!r}") for u in san_uris)
        dns_names = tuple(_parse_value(d, f"san_dns {d!r}") for d in san_dns)
        template = cls(subject, tuple(attributes), tuple(sorted(constants.items())), uris, dns_names)
        used = set().union(*(v.placeholders for v in template._values()))
        unknown = sorted(
            f for f in used if f != ID_FIELD and not f.startswith(META_PREFIX) and f not in constants
        )
        if unknown:
            raise ConfigError(
                f"subject template uses undefined field(s) {', '.join('{' + f + '}' for f in unknown)}; "
                "define them in subject_fields, or use {id} or {meta.COLUMN}"
            )
        unused = sorted(set(constants) - used)
        if unused:
            raise ConfigError(
                f"subject_fields {', '.join(unused)} are not used by the subject or SAN templates"
            )
        template._check_static(id_chars)
        return template

    @staticmethod
    def _parse_attribute(part: str, index: int) -> _Attribute:
        kind_text, sep, value_text = part.strip().partition("=")
        if not sep:
            raise ConfigError(
                f"subject template part {index} {part.strip()!r} is not TYPE=VALUE "
                "(attributes are separated by commas, e.g. 'O={org}, CN={id}')"
            )
        kind = _TYPES_BY_KEY.get(kind_text.strip().lower())
        if kind is None:
            raise ConfigError(
                f"subject template: unknown attribute type {kind_text.strip()!r} "
                f"(known: {', '.join(KNOWN_ATTRIBUTES)})"
            )
        return _Attribute(kind, _parse_value(value_text.strip(), f"subject {kind.name}"))

    def _values(self) -> list[_Value]:
        return [a.value for a in self.attributes] + list(self.uris) + list(self.dns_names)

    @property
    def is_default(self) -> bool:
        """True for the plain ``CN={id}`` subject without SANs (the only one arduino-v1 can carry)."""
        return (
            len(self.attributes) == 1
            and self.attributes[0].kind.oid == NameOID.COMMON_NAME
            and self.attributes[0].value.pieces == (_Piece("", ID_FIELD),)
            and not self.uris
            and not self.dns_names
        )

    def _check_static(self, id_chars: int | None) -> None:
        """Check what is known at lot creation: literal text and constants, and lengths when IDs are fixed."""
        constants = dict(self.fields)
        for attribute in self.attributes:
            kind = attribute.kind
            known = "".join(
                p.text if p.field is None else constants.get(p.field, "") for p in attribute.value.pieces
            )
            # Per-device values stand in as one harmless letter, so "dev {id}" is not taken for a value
            # that ends in a space; they are checked themselves when a certificate is issued.
            probe = "".join(
                p.text if p.field is None else constants.get(p.field, "x") for p in attribute.value.pieces
            )
            problem = _value_problem(probe, printable_string=kind.asn1_type is _PRINTABLE) if known else None
            if problem:
                raise ConfigError(f"subject {kind.name} ({known!r}) {problem}")
            minimum = len(known) + (id_chars or 0) * sum(
                1 for p in attribute.value.pieces if p.field == ID_FIELD
            )
            if minimum > kind.max_chars:
                raise ConfigError(
                    f"subject {kind.name} would be at least {minimum} characters, over the RFC 5280 "
                    f"limit of {kind.max_chars}"
                )
            if not attribute.value.placeholders - set(constants) and len(known) < kind.min_chars:
                raise ConfigError(f"subject {kind.name} must be {kind.min_chars} characters")
        for value in self.uris:
            literal = "".join(p.text for p in value.pieces)
            if any(not ch.isascii() or not ch.isprintable() or ch.isspace() for ch in literal):
                raise ConfigError(f"san_uris: {literal!r} has non-ASCII, space or control characters")
            if not re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:", literal):
                raise ConfigError(
                    f"san_uris: a URI template must start with its scheme, e.g. 'urn:', not {literal!r}"
                )
        for value in self.dns_names:
            literal = "".join(p.text for p in value.pieces)
            if not re.fullmatch(r"[A-Za-z0-9.\-]*", literal):
                raise ConfigError(f"san_dns: {literal!r} has characters a host name cannot hold")

    def render(self, device_id: str, metadata: Mapping[str, str] | None = None) -> RenderedIdentity:
        """The device's subject and SANs; IssuanceError naming the value that cannot be used."""
        values = {ID_FIELD: device_id, **dict(self.fields)}
        meta = dict(metadata or {})

        def fill(value: _Value, where: str) -> str:
            out = []
            for piece in value.pieces:
                if piece.field is None:
                    out.append(piece.text)
                elif piece.field.startswith(META_PREFIX):
                    column = piece.field.removeprefix(META_PREFIX)
                    if column not in meta:
                        raise IssuanceError(
                            f"device {device_id!r}: {where} needs the ID-list column {column!r}, "
                            "which its line does not have"
                        )
                    out.append(meta[column])
                else:
                    out.append(values[piece.field])
            return "".join(out)

        rdns = []
        common_name = ""
        for attribute in self.attributes:
            kind = attribute.kind
            text = fill(attribute.value, f"subject {kind.name}")
            if kind.oid == NameOID.COMMON_NAME:
                common_name = text
            if attribute.value.pieces == (_Piece("", ID_FIELD),):
                # The bare device ID: the lot's id_format already vouched for its characters.
                problem = "is empty" if not text else None
                if any(not ch.isprintable() for ch in text):
                    problem = "contains control characters"
                elif kind.asn1_type is _PRINTABLE and not _PRINTABLE_STRING.fullmatch(text):
                    problem = "has characters outside PrintableString"
            else:
                problem = _value_problem(text, printable_string=kind.asn1_type is _PRINTABLE)
            if problem is None and not kind.min_chars <= len(text) <= kind.max_chars:
                problem = (
                    f"is {len(text)} characters long; RFC 5280 allows {kind.min_chars}..{kind.max_chars}"
                )
            if problem:
                raise IssuanceError(f"device {device_id!r}: subject {kind.name} {_show(text)} {problem}")
            rdns.append(
                x509.RelativeDistinguishedName([x509.NameAttribute(kind.oid, text, _type=kind.asn1_type)])
            )
        uris = tuple(fill(v, "san_uris") for v in self.uris)
        for uri in uris:
            if len(uri) > MAX_URI_CHARS or not _URI.fullmatch(uri):
                raise IssuanceError(
                    f"device {device_id!r}: URI SAN {_show(uri)} is not a valid URI (RFC 3986)"
                )
        dns_names = tuple(fill(v, "san_dns") for v in self.dns_names)
        for name in dns_names:
            labels = name.split(".")
            if len(name) > MAX_DNS_NAME_CHARS or not all(_DNS_LABEL.fullmatch(label) for label in labels):
                raise IssuanceError(f"device {device_id!r}: DNS SAN {_show(name)} is not a valid host name")
        return RenderedIdentity(x509.Name(rdns), common_name, uris, dns_names)


def _show(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")


DEFAULT_TEMPLATE = SubjectTemplate.parse()
