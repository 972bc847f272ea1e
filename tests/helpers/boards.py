"""Simulated boards for tests: short reply timeouts so fault tests that wait for resends stay fast."""

from __future__ import annotations

from factoryd.protocol.native import Timeouts

# Short timeouts so fault tests that wait for resends stay fast.
FAST_TIMEOUTS = Timeouts(
    hello_s=0.2,
    keygen_s=0.3,
    csr_s=0.3,
    write_s=0.3,
    read_s=0.2,
    sign_s=0.3,
    lock_s=0.2,
    reboot_s=0.2,
    fw_chunk_s=0.2,
    fw_end_s=0.3,
)
