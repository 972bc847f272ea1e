"""Errors of the signing service and of a station talking to it (drawn in factoryd/errors.py's tree)."""

from __future__ import annotations

from factoryd.errors import InputError, PkiError


class SigningRefusedError(PkiError):
    """The signer refused a request; ``code`` names the broken rule (the station's failure reason)."""

    # Only an instance made without __init__ (the error-tree test) lacks its own.
    _code: str = "refused"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self._code = code

    @property
    def code(self) -> str:
        """The refused rule as the signer names it (``not_reserved``, ``quota_exhausted``, …)."""
        return self._code

    @property
    def reason(self) -> str:
        """``signer_<code>``: label-safe, and says which side refused."""
        return f"signer_{self._code}"


class SignerUnavailableError(PkiError):
    """The signer could not be reached or did not answer in time (the board waits, then restarts)."""

    transient = True


class QuotaError(InputError):
    """A customer quota file was refused (malformed, signature, lot, signer); nothing was installed."""
