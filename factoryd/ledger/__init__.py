"""The allocation ledger: which device ID went onto which board, exactly once, with an audit trail.

``Ledger`` is the sync core (one committed transaction per call); ``AsyncLedger`` runs the
same calls on a private worker thread for the event loop.
"""

from factoryd.ledger.aio import AsyncLedger
from factoryd.ledger.core import Ledger, verify_audit
from factoryd.ledger.errors import (
    DeviceNotFoundError,
    DeviceStateError,
    JobNotFoundError,
    LedgerUnavailableError,
    LotExistsError,
)
from factoryd.ledger.idlist import DEFAULT_MAX_BYTES
from factoryd.ledger.model import (
    DeviceRecord,
    DeviceState,
    LotInfo,
    LotProgress,
    LotState,
    ProvisionedDevice,
    Reservation,
)
from factoryd.ledger.profile import LotProfile

__all__ = [
    "DEFAULT_MAX_BYTES",
    "AsyncLedger",
    "DeviceNotFoundError",
    "DeviceRecord",
    "DeviceState",
    "DeviceStateError",
    "JobNotFoundError",
    "Ledger",
    "LedgerUnavailableError",
    "LotExistsError",
    "LotInfo",
    "LotProfile",
    "LotProgress",
    "LotState",
    "ProvisionedDevice",
    "Reservation",
    "verify_audit",
]
