"""factoryd: a factory bulk-provisioning line daemon."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("factoryd")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
