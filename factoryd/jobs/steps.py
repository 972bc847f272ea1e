"""The steps of a provisioning job: metric and event label values, and what the station page shows.

Every board profile's job sequence names its steps from this one enum, so telemetry labels, the
page's progress text and the Grafana panels agree on the same words.
"""

from __future__ import annotations

from enum import StrEnum


class Step(StrEnum):
    """Pipeline steps (metric and event label values)."""

    POWER = "power"
    ENUMERATE = "enumerate"
    HELLO = "hello"
    FIRMWARE = "firmware"
    ATTEST = "attest"
    RECHECK = "recheck"
    RESERVE = "reserve"
    KEYGEN = "keygen"
    CSR = "csr"
    ISSUE = "issue"
    WRITE = "write"
    CHALLENGE = "challenge"
    LOCK = "lock"
    RECORD = "record"
    STORE = "store"
    RECONSTRUCT = "reconstruct"
