"""The USB serial number of the device behind a tty, read from sysfs (udev's ID_SERIAL_SHORT).

Boards whose provisioning firmware cannot report a secure-element serial (Arduino's sketch) are
identified by it. Factory-fresh boards sometimes report none or a shared one; callers refuse those.
"""

from __future__ import annotations

import os
from pathlib import Path

# How far up from the tty's interface the USB device (which has the `serial` file) may be.
MAX_PARENT_HOPS = 4


def usb_serial_of_tty(tty: str, *, sys_class_tty: Path = Path("/sys/class/tty")) -> str | None:
    """Read the USB serial of the device owning ``tty`` (a /dev path or symlink); None if none."""
    name = os.path.basename(os.path.realpath(tty))
    node = sys_class_tty / name / "device"
    try:
        current = node.resolve(strict=True)
    except OSError:
        return None
    for _ in range(MAX_PARENT_HOPS):
        serial = current / "serial"
        if serial.is_file():
            try:
                value = serial.read_text(encoding="ascii", errors="replace").strip()
            except OSError:
                return None
            return value or None
        current = current.parent
    return None
