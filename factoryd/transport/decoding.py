"""What every board profile's framer shares: the ``Decoder`` interface and its counters (no I/O).

A framer (``framing.py`` for factoryd-v1, ``arduino_framing.py`` for arduino-v1) turns a byte
stream into frames and never raises on line noise: it counts what it had to discard here, and
``SerialLink`` feeds it whatever arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class DecoderStats:
    """Counters of what a decoder returned and what it had to discard."""

    frames: int = 0
    crc_errors: int = 0
    malformed: int = 0
    oversize: int = 0
    garbage_bytes: int = 0


class Decoder(Protocol):
    """An I/O-free frame decoder (``FrameDecoder``, ``ArduinoDecoder``)."""

    @property
    def stats(self) -> DecoderStats:
        """What it decoded and discarded so far."""
        ...

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return completed frames."""
        ...

    def take_errors(self) -> int:
        """Return and reset the count of undecodable frames."""
        ...

    def flush(self) -> int:
        """Drop a half-received frame; return its size in bytes."""
        ...
