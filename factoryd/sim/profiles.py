"""The simulated board of every board profile, keyed by the registry's names (``factoryd.jobs.profiles``).

Kept on the sim side because nothing in ``jobs/`` or ``ledger/`` may import ``factoryd.sim``;
``tests/test_profiles.py`` checks that every registered profile has an entry here.
"""

from __future__ import annotations

from factoryd.sim.arduino import SimArduinoBoard
from factoryd.sim.board import SimBoard
from factoryd.sim.mcumgr import SimMcumgrBoard
from factoryd.sim.nrf91 import SimNrf91Modem

SIM_BOARDS: dict[str, type[SimBoard]] = {
    "factoryd-v1": SimBoard,
    "arduino-v1": SimArduinoBoard,
    "mcumgr": SimMcumgrBoard,
    "nrf91-at": SimNrf91Modem,
}
