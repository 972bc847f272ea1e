"""systemd's notify protocol (sd_notify): READY=1, WATCHDOG=1, STATUS=…, STOPPING=1.

The protocol is one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET; without that
variable (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends notifications to systemd, if it is listening."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        self._address = address or None

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is configured."""
        return self._address is not None

    def notify(self, *fields: str) -> None:
        """Send newline-separated KEY=VALUE fields; failures are logged, never raised."""
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc))

    async def watchdog(self) -> None:
        """Ping the watchdog at half of $WATCHDOG_USEC until cancelled (a no-op when not asked for)."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not self.enabled or not usec or (pid and int(pid) != os.getpid()):
            return
        interval_s = int(usec) / 1e6 / 2
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    def stopping(self) -> None:
        """Tell systemd the service is shutting down."""
        with contextlib.suppress(OSError):
            self.notify("STOPPING=1")
