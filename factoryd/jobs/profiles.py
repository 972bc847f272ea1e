"""The board-profile registry: one line per profile, chosen by name (``LotProfile.protocol``).

A profile is four modules of the same shape: an I/O-free framer (``transport/``), a typed client on
the shared request engine (``protocol/``), a job sequence (``jobs/``, a ``BoardSession``) and a
simulated board (``sim/``). This registry names the first three; adding a profile is its four
files and one line in ``PROFILES`` (plus its simulated board in ``factoryd.sim.profiles``).

Why the simulated boards are not in this table: ``LotProfile`` (``ledger/``) validates its
``protocol`` against these names, and no module in ``hub/``, ``protocol/``, ``transport/``,
``jobs/``, ``ledger/`` or ``pki/`` may import ``factoryd.sim`` (the simulator is a backend, not a
driver). So the sim side keeps its own table keyed by the same names, and
``tests/test_profiles.py`` fails when a registered profile has no simulated board.

Why ``LotProfile`` imports this module inside its validator: the job modules import the ledger
(re-check look-ups), and the ledger package imports ``LotProfile`` while it initialises; a
module-level import either way would be a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from factoryd.jobs.arduino import ARDUINO_STEPS, ArduinoSession
from factoryd.jobs.board import SECURE_ELEMENT_STEPS, SessionFactory
from factoryd.jobs.mcumgr import McumgrSession
from factoryd.jobs.native import NativeSession
from factoryd.jobs.nrf91 import NRF91_STEPS, Nrf91Session, check_chain_fits
from factoryd.jobs.steps import Step
from factoryd.pki.profile import ProfileKind

if TYPE_CHECKING:
    from factoryd.ledger.profile import LotProfile
from factoryd.protocol.arduino import ArduinoClient
from factoryd.protocol.mcumgr import McumgrClient
from factoryd.protocol.native import BoardClient
from factoryd.protocol.nrf91 import Nrf91Client
from factoryd.transport.arduino_framing import ArduinoDecoder
from factoryd.transport.at_codec import AtDecoder
from factoryd.transport.decoding import Decoder
from factoryd.transport.framing import FrameDecoder
from factoryd.transport.smp_framing import SmpDecoder


@dataclass(frozen=True)
class BoardProfile:
    """One board profile: its framer, its client and its job sequence."""

    name: str
    framer: Callable[[], Decoder]
    client: type
    session: SessionFactory
    # The certificate profile its boards get (pki/profile.py): the device certificate layout.
    cert_kind: ProfileKind
    summary: str
    # Its job's steps in the order they run: the scale of a slot's progress bar on the station page.
    # Power and USB count too, so a bar never starts at zero; the re-check detour is in none.
    steps: tuple[Step, ...]
    # Whether its session can attest a new key (jobs.board.AttestingSession): lots with
    # attestation = required need such a profile (checked when the lot profile is validated).
    attests: bool = False
    # What this profile's boards cannot take from a lot's CA chain, checked when a bundle is
    # stored (e.g. a chain longer than the nRF91 AT line): (lot profile, chain PEM, lot name).
    check_chain: Callable[[LotProfile, bytes, str], None] | None = None
    # Whether its boards are identified by an IMEI (jobs.board.ChosenIdSession): lots with
    # device_id_from = imei need such a profile (checked when the lot profile is validated).
    imei_identity: bool = False


PROFILES: dict[str, BoardProfile] = {
    profile.name: profile
    for profile in (
        BoardProfile(
            "factoryd-v1",
            FrameDecoder,
            BoardClient,
            NativeSession,
            "factoryd-v1",
            "factoryd firmware",
            steps=SECURE_ELEMENT_STEPS,
            attests=True,
        ),
        BoardProfile(
            "arduino-v1",
            ArduinoDecoder,
            ArduinoClient,
            ArduinoSession,
            "arduino-v1",
            "Arduino sketch",
            steps=ARDUINO_STEPS,
        ),
        BoardProfile(
            "mcumgr",
            SmpDecoder,
            McumgrClient,
            McumgrSession,
            "factoryd-v1",
            "Zephyr/MCUboot over SMP",
            steps=SECURE_ELEMENT_STEPS,
            attests=True,
        ),
        BoardProfile(
            "nrf91-at",
            AtDecoder,
            Nrf91Client,
            Nrf91Session,
            "factoryd-v1",
            "nRF91 modem, stock AT firmware",
            steps=NRF91_STEPS,
            check_chain=check_chain_fits,
            imei_identity=True,
        ),
    )
}


def profile_names() -> tuple[str, ...]:
    """The registered profile names, in registry order."""
    return tuple(PROFILES)


def board_profile(name: str) -> BoardProfile:
    """The profile registered under ``name``; ValueError listing the known names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown board profile {name!r}; known: {', '.join(PROFILES)}") from None
