"""Ledger-specific refinements of :mod:`factoryd.errors` (all are ``LedgerError``)."""

from __future__ import annotations

from factoryd.errors import LedgerError


class LotExistsError(LedgerError):
    """A lot with that name already exists."""


class DeviceNotFoundError(LedgerError):
    """No such device ID in the lot."""


class DeviceStateError(LedgerError):
    """The device ID is not in a state that allows the operation (e.g. already void)."""


class JobNotFoundError(LedgerError):
    """No such job."""


class LedgerUnavailableError(LedgerError):
    """The database could not be reached or stayed locked; retrying can help."""

    transient = True


class LedgerStorageFullError(LedgerUnavailableError):
    """The ledger's database could not write: its disk is full (SQLITE_FULL); retry once space returns."""
