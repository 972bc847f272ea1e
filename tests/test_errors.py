"""The exception tree in factoryd/errors.py's docstring names every error class the package defines."""

from __future__ import annotations

import importlib
import pkgutil

import factoryd
from factoryd import errors
from factoryd.errors import FactorydError


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _all_subclasses(sub)
    return found


def test_every_error_class_is_in_the_drawn_tree() -> None:
    for module in pkgutil.walk_packages(factoryd.__path__, "factoryd."):
        if ".migrations" in module.name or module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)
    tree = errors.__doc__ or ""
    missing = sorted(
        f"{cls.__module__}.{cls.__name__}"
        for cls in _all_subclasses(FactorydError)
        if cls.__module__.startswith("factoryd") and cls.__name__ not in tree
    )
    assert not missing, f"add these to the tree in factoryd/errors.py: {missing}"


def test_reason_codes_are_label_safe() -> None:
    for cls in _all_subclasses(FactorydError) | {FactorydError}:
        reason = cls.__new__(cls).reason
        assert reason.replace("_", "").isalnum(), reason
        assert reason == reason.lower()


def test_timeouts_are_timeout_errors_and_transient_flags() -> None:
    assert issubclass(errors.BoardTimeoutError, TimeoutError)
    assert issubclass(errors.EnumerationTimeoutError, TimeoutError)
    assert errors.BoardTimeoutError("x").transient
    assert errors.LinkClosedError("x").transient
    assert not errors.CsrRejectedError("x").transient
    assert not errors.IdsExhaustedError("x").transient
    assert errors.BoardStatusError("x", 1, transient=True).transient
    assert not errors.BoardLockedError("x", 5).transient
