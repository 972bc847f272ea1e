"""The per-lot provisioning profile, stored as JSON in the lot row."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from factoryd.errors import ConfigError
from factoryd.matter.profile import MatterProfile
from factoryd.mcuboot import (
    DEFAULT_ALIGN_BYTES,
    DEFAULT_MAX_ALIGN_BYTES,
    DEFAULT_MAX_SECTORS,
    KeyFormat,
    McubootImageError,
    swap_trailer_bytes,
)

if TYPE_CHECKING:
    from factoryd.jobs.profiles import BoardProfile
    from factoryd.pki.template import SubjectTemplate

ID_FORMAT_UUID = "uuid"
ID_FORMAT_REGEX_PREFIX = "regex:"
# Ten years: the usual lifetime of an industrial device certificate.
DEFAULT_CERT_VALIDITY_DAYS = 3650
# A hundred years is beyond any sane device lifetime; larger values are typos.
MAX_CERT_VALIDITY_DAYS = 36_500

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
IMEI_FIELD = "{imei}"
DEFAULT_DEVICE_ID_TEMPLATE = "nrf-{imei}"
# A well-formed 15-digit IMEI: what a template's result is checked against the id_format with.
_SAMPLE_IMEI = "352656100123456"
# The board profiles whose firmware stores Matter factory data objects (docs/matter.md).
MATTER_PROTOCOLS = ("factoryd-v1", "mcumgr")


class LotProfile(BaseModel):
    """How the boards of one lot are provisioned."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A board profile name from factoryd.jobs.profiles.PROFILES.
    protocol: str = "factoryd-v1"
    id_format: str = ID_FORMAT_UUID
    # Firmware (docs/firmware.md). The image format: MCUboot is the only one (the old raw r||s blob
    # had no stock bootloader and no user left; an external flasher writes an MCUboot image as well).
    firmware_format: Literal["mcuboot"] = "mcuboot"
    # The board's image slot in bytes (primary = secondary); an image must fit it with its trailer.
    slot_size: int | None = Field(default=None, ge=1)
    # MCUboot's swap trailer geometry at the slot end (imgtool sign --align/--max-align/-M).
    trailer_align: int = DEFAULT_ALIGN_BYTES
    trailer_max_align: int = DEFAULT_MAX_ALIGN_BYTES
    trailer_max_sectors: int = DEFAULT_MAX_SECTORS
    # How the board's MCUboot finds the signing key: by hash (stock builds) or in full (HW key builds).
    firmware_key_format: KeyFormat = KeyFormat.HASH
    # The current image, recorded by `factoryd lots firmware` (Ledger.record_lot_firmware): its MCUboot
    # hash (the SHA256 TLV, what the board reports; not the file's hash), version and security counter,
    # and the hash of the lot's firmware-signing key (set by the first image, or up front).
    # With firmware_sha256 set the station flashes that image before provisioning.
    firmware_sha256: str | None = None
    firmware_version: str | None = None
    firmware_security_counter: int | None = Field(default=None, ge=0, le=0xFFFF_FFFF)
    firmware_key_hash: str | None = None
    cert_validity_days: int = Field(default=DEFAULT_CERT_VALIDITY_DAYS, ge=1, le=MAX_CERT_VALIDITY_DAYS)
    endpoint: str = Field(default="mqtts://iot.example.com:8883", min_length=1)
    lock: bool = False
    allow_rework: bool = False
    # Genuine parts only (pki/attestation.py): "required" makes every board attest its new key to
    # one of the lot's attestation roots before it gets an ID; needs a profile that can attest.
    attestation: Literal["none", "required"] = "none"
    max_attempts: int = Field(default=3, ge=1)
    # Device certificate subject, most significant first: "O={org}, CN={id}" (docs/clouds.md).
    subject: str = "CN={id}"
    # Lot constants for the subject and SAN templates ({org} -> subject_fields["org"]).
    subject_fields: dict[str, str] = Field(default_factory=dict)
    san_uris: tuple[str, ...] = ()
    san_dns: tuple[str, ...] = ()
    # nrf91-at (docs/nrf91.md): the modem security tag the credentials go to (nRF Cloud's by default),
    # the lowest modem firmware accepted (x.y.z; the job's own floor is 1.3.2, the first to list
    # SHA-256 values), and the longest AT command line every hop buffers (modem AT host: 4096).
    sec_tag: int = Field(default=16_842_753, ge=0, le=2_147_483_647)
    modem_fw_min: str | None = Field(default=None, pattern=r"^\d+\.\d+\.\d+$")
    at_line_max_bytes: int = Field(default=4096, ge=256, le=4096)
    # nrf91-at: device identity public keys (PEM) by device UUID (32 hex digits), from nRF Cloud's
    # identity service. When set, a modem whose UUID is not listed, or whose attestation token or
    # %KEYGEN attestation does not verify with its key, is refused.
    nrf91_identity_keys: dict[str, str] = Field(default_factory=dict)
    # Where a board's device ID comes from (docs/nrf91.md): the next one of the customer's list, or
    # derived from the modem's IMEI with this template, the customer's list being the allowed IDs.
    device_id_from: Literal["list", "imei"] = "list"
    device_id_template: str = DEFAULT_DEVICE_ID_TEMPLATE
    # A Matter lot (docs/matter.md): the CA bundle is the customer's PAI, each device gets a DAC,
    # the PAI, the Certification Declaration, a SPAKE2+ verifier and its onboarding codes.
    matter: MatterProfile | None = None

    def derived_device_id(self, imei: str) -> str:
        """The device ID the lot's template makes of an IMEI."""
        return self.device_id_template.replace(IMEI_FIELD, imei)

    def subject_template(self) -> SubjectTemplate:
        """The parsed subject/SAN template of the lot's device certificates."""
        from factoryd.pki.template import UUID_CHARS, SubjectTemplate  # noqa: PLC0415 - pki imports ledger

        return SubjectTemplate.parse(
            self.subject,
            fields=self.subject_fields,
            san_uris=self.san_uris,
            san_dns=self.san_dns,
            id_chars=UUID_CHARS if self.id_format == ID_FORMAT_UUID else None,
        )

    @model_validator(mode="after")
    def _check_subject_template(self) -> Self:
        try:
            template = self.subject_template()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if not template.is_default:
            from factoryd.jobs.profiles import board_profile  # noqa: PLC0415 - see _check_protocol
            from factoryd.pki.profile import ARDUINO_TEMPLATE_REFUSAL  # noqa: PLC0415

            if board_profile(self.protocol).cert_kind == "arduino-v1":
                raise ValueError(f"protocol {self.protocol}: {ARDUINO_TEMPLATE_REFUSAL}")
        return self

    @model_validator(mode="after")
    def _check_attestation(self) -> Self:
        if self.attestation == "required":
            from factoryd.jobs.profiles import board_profile  # noqa: PLC0415 - see _check_protocol

            if not board_profile(self.protocol).attests:
                raise ValueError(
                    f"attestation = required: board profile {self.protocol} cannot attest its keys "
                    "(profiles that can: " + ", ".join(p.name for p in _attesting_profiles()) + ")"
                )
        return self

    @model_validator(mode="after")
    def _check_matter(self) -> Self:
        if self.matter is not None and self.protocol not in MATTER_PROTOCOLS:
            raise ValueError(
                f"matter: board profile {self.protocol} cannot hold Matter factory data "
                f"(profiles that can: {', '.join(MATTER_PROTOCOLS)})"
            )
        return self

    @model_validator(mode="after")
    def _check_device_id_from(self) -> Self:
        template = self.device_id_template
        rest = template.replace(IMEI_FIELD, "")
        if template.count(IMEI_FIELD) != 1 or "{" in rest or "}" in rest:
            raise ValueError(
                f"device_id_template {template!r} must hold {IMEI_FIELD} exactly once and no other field"
            )
        if self.device_id_from != "imei":
            return self
        from factoryd.jobs.profiles import board_profile  # noqa: PLC0415 - see _check_protocol

        if not board_profile(self.protocol).imei_identity:
            raise ValueError(
                f"device_id_from = imei: board profile {self.protocol} does not identify its boards by "
                "an IMEI (profiles that do: " + ", ".join(p.name for p in _imei_profiles()) + ")"
            )
        sample = self.derived_device_id(_SAMPLE_IMEI)
        example = re.escape(template).replace(re.escape(IMEI_FIELD), "[0-9]{15}")
        hint = f'use e.g. id_format = "regex:{example}"'
        if self.id_format == ID_FORMAT_UUID:
            raise ValueError(f"device_id_from = imei makes IDs like {sample!r}, which are not UUIDs; {hint}")
        pattern = self.id_format.removeprefix(ID_FORMAT_REGEX_PREFIX)
        if re.fullmatch(pattern, sample) is None:
            raise ValueError(
                f"device_id_from = imei makes IDs like {sample!r}, which the lot's id_format "
                f"{self.id_format!r} does not match; {hint}"
            )
        return self

    @field_validator("protocol")
    @classmethod
    def _check_protocol(cls, value: str) -> str:
        # Imported here: the registry imports the job modules, which import this package (a cycle).
        from factoryd.jobs.profiles import profile_names  # noqa: PLC0415

        known = profile_names()
        if value not in known:
            raise ValueError(f"unknown board protocol {value!r}; known: {', '.join(known)}")
        return value

    @field_validator("id_format")
    @classmethod
    def _check_id_format(cls, value: str) -> str:
        if value == ID_FORMAT_UUID:
            return value
        if value.startswith(ID_FORMAT_REGEX_PREFIX):
            pattern = value.removeprefix(ID_FORMAT_REGEX_PREFIX)
            if not pattern:
                raise ValueError("regex id_format has an empty pattern")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"regex id_format does not compile: {exc}") from exc
            return value
        raise ValueError(f"id_format must be 'uuid' or 'regex:<pattern>', not {value!r}")

    @field_validator("firmware_sha256", "firmware_key_hash")
    @classmethod
    def _check_sha256(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _SHA256_HEX.fullmatch(value):
            raise ValueError(f"{info.field_name} must be 64 lowercase hex digits")
        return value

    @field_validator("nrf91_identity_keys")
    @classmethod
    def _check_identity_keys(cls, value: dict[str, str]) -> dict[str, str]:
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - only nrf91-at lots
        from cryptography.hazmat.primitives.serialization import load_pem_public_key  # noqa: PLC0415

        for device_uuid, pem in value.items():
            if not re.fullmatch(r"[0-9a-f]{32}", device_uuid):
                raise ValueError(
                    f"nrf91_identity_keys: {device_uuid!r} is not a device UUID (32 lowercase hex)"
                )
            try:
                key = load_pem_public_key(pem.encode("ascii"))
            except (ValueError, UnicodeEncodeError) as exc:
                raise ValueError(
                    f"nrf91_identity_keys[{device_uuid}] is not a PEM public key: {exc}"
                ) from None
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
                raise ValueError(f"nrf91_identity_keys[{device_uuid}] is not an EC P-256 key")
        return value

    @field_validator("firmware_format", mode="before")
    @classmethod
    def _check_firmware_format(cls, value: object) -> object:
        if value != "mcuboot":
            raise ValueError(
                f"firmware_format {value!r} is not supported: lot firmware is an MCUboot image "
                "(imgtool sign), the only format stock bootloaders accept (docs/firmware.md)"
            )
        return value

    @model_validator(mode="after")
    def _check_trailer(self) -> Self:
        try:
            self.trailer_bytes()
        except McubootImageError as exc:
            raise ValueError(str(exc)) from None
        return self

    def trailer_bytes(self) -> int:
        """Bytes of MCUboot's swap trailer at the end of the lot's image slot."""
        return swap_trailer_bytes(
            align=self.trailer_align, max_align=self.trailer_max_align, max_sectors=self.trailer_max_sectors
        )


def _imei_profiles() -> list[BoardProfile]:
    from factoryd.jobs.profiles import PROFILES  # noqa: PLC0415 - see LotProfile._check_protocol

    return [p for p in PROFILES.values() if p.imei_identity]


def _attesting_profiles() -> list[BoardProfile]:
    from factoryd.jobs.profiles import PROFILES  # noqa: PLC0415 - see LotProfile._check_protocol

    return [p for p in PROFILES.values() if p.attests]
