"""Errors of the HTTP API and its token store, refining :mod:`factoryd.errors`.

::

    FactorydError
    ├── InputError
    │   ├── TokenExistsError        a token with that name exists (HTTP 409)
    │   └── TokenNotFoundError      no token with that name (HTTP 404)
    └── TokenRejectedError          malformed, unknown, expired or revoked token (HTTP 401)
"""

from __future__ import annotations

from factoryd.errors import FactorydError, InputError


class TokenExistsError(InputError):
    """A token with that name already exists (names stay taken after revocation)."""


class TokenNotFoundError(InputError):
    """No token with that name."""


class TokenRejectedError(FactorydError):
    """The presented bearer token does not authenticate anyone; ``name`` is set when it was known."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name
