"""Errors of the cloud layer, in the package's exception tree (``factoryd.errors``).

::

    FactorydError
    ├── InputError
    │   └── ExportError      a lot's devices cannot be written in the asked format (nothing written)
    └── CloudError           a cloud refused or failed a registration call (the run can be resumed)
"""

from __future__ import annotations

from factoryd.errors import FactorydError, InputError


class ExportError(InputError):
    """The lot's devices cannot be written in the asked format; nothing was written."""


class CloudError(FactorydError):
    """A cloud refused or failed a call; what was done is recorded, a rerun does the rest."""
