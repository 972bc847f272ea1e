"""The Matter part of a lot's profile (``LotProfile.matter``): IDs, DAC validity, onboarding policy."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from factoryd.matter.dac import DacSpec
from factoryd.matter.payload import DISCRIMINATOR_MAX, CommissioningFlow, Rendezvous

# Vendor IDs 0x0000 and 0xFFF5..0xFFFF are reserved; 0xFFF1..0xFFF4 are the test VIDs (spec 2.5.2).
VID_MAX = 0xFFF4
PID_MAX = 0xFFFF
# SPAKE2+ PBKDF parameters allowed by the spec (3.9 / 5.1.1.6): 1000..100000 rounds, 16..32 B salt.
PBKDF_MIN_ITERATIONS = 1000
PBKDF_MAX_ITERATIONS = 100_000
SALT_MIN_BYTES = 16
SALT_MAX_BYTES = 32
# esp-matter-mfg-tool's defaults: 10000 iterations, a 32-byte salt.
DEFAULT_ITERATIONS = 10_000
DEFAULT_SALT_BYTES = 32
# A CD lists at most 100 product IDs.
MAX_PRODUCT_IDS = 100


class MatterProfile(BaseModel):
    """How a Matter lot's devices are made: VID/PID, DAC lifetime, passcode and discriminator policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vendor_id: int = Field(ge=1, le=VID_MAX)
    # The lot's product IDs; with several, each device's ID-list column ``product_id`` picks one.
    product_ids: tuple[int, ...] = Field(min_length=1, max_length=MAX_PRODUCT_IDS)
    # DAC validity: the lot's cert_validity_days, or notAfter 99991231235959Z ("no well-defined
    # expiration", RFC 5280 4.1.2.5), as chip-cert writes for a lifetime of 4294967295 days.
    dac_no_expiry: bool = False
    # Passcodes are always fresh and random per device (a fixed one would defeat PASE); the
    # discriminator is drawn per device from this inclusive range.
    discriminator_min: int = Field(default=0, ge=0, le=DISCRIMINATOR_MAX)
    discriminator_max: int = Field(default=DISCRIMINATOR_MAX, ge=0, le=DISCRIMINATOR_MAX)
    iterations: int = Field(default=DEFAULT_ITERATIONS, ge=PBKDF_MIN_ITERATIONS, le=PBKDF_MAX_ITERATIONS)
    salt_bytes: int = Field(default=DEFAULT_SALT_BYTES, ge=SALT_MIN_BYTES, le=SALT_MAX_BYTES)
    # What the QR payload advertises (bitmap: 1 SoftAP, 2 BLE, 4 on-network, 8 Wi-Fi PAF).
    rendezvous: int = Field(default=int(Rendezvous.BLE), ge=0, le=0xFF)
    flow: CommissioningFlow = CommissioningFlow.STANDARD

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.discriminator_min > self.discriminator_max:
            raise ValueError(
                f"matter.discriminator_min {self.discriminator_min} is above discriminator_max "
                f"{self.discriminator_max}"
            )
        if len(set(self.product_ids)) != len(self.product_ids):
            raise ValueError("matter.product_ids lists a product ID twice")
        for pid in self.product_ids:
            if not 1 <= pid <= PID_MAX:
                raise ValueError(f"matter.product_ids: {pid} is not a product ID (1..0xFFFF)")
        return self

    def dac_spec(self) -> DacSpec:
        """The DAC shape the issuer follows for this lot."""
        return DacSpec(vendor_id=self.vendor_id, product_ids=self.product_ids, no_expiry=self.dac_no_expiry)
