"""Run the openssl command line, the vendor oracle for certificates and CMS in the Matter tests."""

from __future__ import annotations

import shutil
import subprocess

OPENSSL_TIMEOUT_S = 30


def openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    """``openssl ARGS…`` with output captured (never raises on a failed verification: check returncode)."""
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("openssl is not installed (apt-get install openssl)")
    return subprocess.run(  # noqa: S603 - fixed binary, argv built by the tests from tmp_path files
        [binary, *args], capture_output=True, check=False, timeout=OPENSSL_TIMEOUT_S
    )
