"""What the station page says and where: step texts, each profile's step order, the grid.

Reason sentences live in ``factoryd.telemetry.reasons``: the page and MQTT say the same words.

Step labels are keyed by :class:`~factoryd.jobs.steps.Step`, so a new step without a label fails
``tests/test_page.py``. A slot's progress bar ("Step 4 of 8") counts its step's place in the step
sequence of its lot's board profile (``BoardProfile.steps``, ``factoryd.jobs.profiles``); a step
outside that sequence (the re-check detour, a step string this page does not know) or a lot whose
profile is not known yet shows its label without a count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from factoryd.config import PageConfig
from factoryd.jobs.profiles import PROFILES
from factoryd.jobs.steps import Step

# Every pipeline step with the words a slot shows while the board is in it.
STEP_TEXT: dict[Step, str] = {
    Step.POWER: "Switching the port on",
    Step.ENUMERATE: "Waiting for USB",
    Step.HELLO: "Identifying the board",
    Step.FIRMWARE: "Flashing firmware",
    Step.ATTEST: "Checking the secure element is genuine",
    Step.RECHECK: "Re-checking a provisioned board",
    Step.RESERVE: "Reserving a device ID",
    Step.KEYGEN: "Making the key in the secure element",
    Step.CSR: "Reading the certificate request",
    Step.ISSUE: "Issuing the certificate",
    Step.WRITE: "Writing and reading back",
    Step.CHALLENGE: "Checking the new key",
    Step.LOCK: "Locking the secure element",
    Step.RECORD: "Recording the device",
    Step.STORE: "Storing the certificate on the board",
    Step.RECONSTRUCT: "Checking the stored certificate",
}
# A step string no Step names (a newer pipeline, a typo): still a sentence, never a crash.
UNKNOWN_STEP_TEXT = "Working on the board"
UNKNOWN_STEP_SHOWN_CHARS = 40

# Steps in no sequence on purpose: a board already provisioned is re-checked instead of provisioned
# (hello, then recheck, then done), so it has no place on the provisioning bar.
STEP_DETOURS = frozenset({Step.RECHECK})


def parse_step(code: str | None) -> Step | None:
    """The Step a telemetry step string names; None for no step or one this page does not know."""
    if code is None:
        return None
    try:
        return Step(code)
    except ValueError:
        return None


def step_text(code: str | None) -> str:
    """What a slot shows for the step string of a port update (known or not)."""
    step = parse_step(code)
    label = STEP_TEXT.get(step) if step is not None else None
    if label is not None:
        return label
    if not code:
        return UNKNOWN_STEP_TEXT
    return f"{UNKNOWN_STEP_TEXT} ({code[:UNKNOWN_STEP_SHOWN_CHARS]})"


def step_progress(code: str | None, protocol: str | None) -> tuple[int, int] | None:
    """(1-based place, number of steps) of a step in its profile's sequence; None when it has none."""
    step = parse_step(code)
    sequence = PROFILES[protocol].steps if protocol in PROFILES else None
    if step is None or sequence is None or step not in sequence:
        return None
    return sequence.index(step) + 1, len(sequence)


def grid_shape(ports: int, rows: int, columns: int) -> tuple[int, int]:
    """(rows, columns) of the slot grid: configured sizes, 0 = automatic, grown to fit every port."""
    count = max(ports, 1)
    if rows == 0 and columns == 0:
        columns = math.ceil(math.sqrt(count))
    elif columns == 0:
        columns = math.ceil(count / rows)
    rows = max(rows, math.ceil(count / columns))
    return rows, columns


def slot_order(hub_ports: Iterable[str], page: PageConfig) -> list[str]:
    """Ports in fixture order: those named in page.slots first (in that order), then the rest."""
    ports = list(hub_ports)
    known = set(ports)
    first = [p for p in page.slots if p in known]
    return first + [p for p in ports if p not in set(first)]
