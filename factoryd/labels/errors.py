"""Errors of the labels layer, in the package's exception tree (``factoryd.errors``).

::

    FactorydError
    ├── InputError
    │   └── LabelTemplateError   a label template refused at lot set-up (the problem named)
    └── LabelError               a label could not be made or printed
        ├── LabelRenderError     no label for that device (missing codes, a code too big, bad ZPL)
        └── PrinterError         the label printer cannot take a job now (transient: the job queues)
            ├── PrinterOfflineError    no TCP connection, or it broke or timed out
            └── PrinterNotReadyError   ~HS: paper out, paused, head open, ribbon out, or no status
"""

from __future__ import annotations

from factoryd.errors import FactorydError, InputError


class LabelTemplateError(InputError):
    """A label template was refused; nothing was stored."""


class LabelError(FactorydError):
    """A label could not be made or printed."""


class LabelRenderError(LabelError):
    """No label can be made for this device with this template (not worth retrying)."""


class PrinterError(LabelError):
    """The label printer cannot take a job now; the job stays queued and is retried."""

    transient = True


class PrinterOfflineError(PrinterError):
    """The printer does not accept a connection, or the connection broke."""


class PrinterNotReadyError(PrinterError):
    """The printer answers but reports a condition that stops printing (``~HS`` flags)."""

    def __init__(self, message: str, *, condition: str) -> None:
        super().__init__(message)
        # One of PrinterStatus.problems' codes (paper_out, paused, head_open, ribbon_out, no_status...).
        self.condition = condition
