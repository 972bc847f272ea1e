"""The nrf91-at framer: AT command lines out, responses and URCs in (NRF91_AT.md), no I/O.

Host to modem: ``encode_command`` builds one command line (``AT...`` + terminator) and refuses a
line longer than the modem's (or the serial bridge's) line buffer. Modem to host:
``AtDecoder.feed(bytes) -> list[AtResponse | AtUrc]``:

- lines are whole lines: ``OK`` matches only a line that *is* ``OK`` (base64url can contain "OK");
- a quoted string may span lines (a PEM in ``%CMNG`` read, the echo of a ``%CMNG`` write): a line
  break inside quotes is content, unless the next line is a final result code, in which case the
  open quote was a truncated line (discarded and counted) and the result code still counts;
- intermediate lines are collected until the final result code (``OK``, ``ERROR``,
  ``+CME ERROR: <n>``, ``+CMS ERROR: <n>``) and handed up as one ``AtResponse``;
- unsolicited result codes (``+CEREG:``, ``%XSIM:``, ``Ready`` at boot, ...) are handed up as
  ``AtUrc`` the moment they arrive, never mixed into a response; ``Ready`` also drops the lines
  collected before it (a rebooted modem finishes no answer);
- the echo of our own command (a line starting with ``AT``) is dropped and counted;
- a line with bytes outside printable ASCII is garbage (counted in ``take_errors``); a line
  longer than ``max_line`` is dropped whole (the buffer never grows beyond it).

``AtCommandDecoder`` is the modem's side (the simulator uses it): command lines end at CR or LF
outside quotes, and a line longer than the modem's buffer is reported as overflowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from factoryd.transport.decoding import DecoderStats

# sdk-nrf's AT host: CONFIG_AT_HOST_CMD_MAX_LEN, default and maximum 4096 bytes (NRF91_AT.md).
AT_HOST_MAX_LINE_BYTES = 4096
# What the host buffers for one response line: a %CMNG read returns a credential of up to a
# whole command line, plus its prefix and quotes; more is a broken or hostile modem.
HOST_MAX_LINE_BYTES = 2 * AT_HOST_MAX_LINE_BYTES
# Nordic's installer terminates with CRLF; the AT host accepts CR, LF or CRLF.
COMMAND_TERMINATOR = b"\r\n"
# Prefixes of unsolicited result codes an nRF91 sends on its own (AT command reference). None of
# the commands this client sends answers with one of them.
URC_PREFIXES = (
    "+CEREG:",
    "+CGEV:",
    "+CSCON:",
    "+CNEC_",
    "+CIREPI:",
    "+CEDRXP:",
    "%XSIM:",
    "%CESQ:",
    "%MDMEV:",
    "%XTIME:",
    "%XMODEMSLEEP:",
    "%XT3412:",
    "%NCELLMEAS:",
)
# What the serial modem application prints once it has (re)booted: a reset, not an answer.
READY_URC = "Ready"
_CME = re.compile(r"\+(CME|CMS) ERROR: ?(\d{1,5})")


class ResultCode(Enum):
    """A final result code."""

    OK = "OK"
    ERROR = "ERROR"
    CME_ERROR = "+CME ERROR"
    CMS_ERROR = "+CMS ERROR"


@dataclass(frozen=True, slots=True)
class AtResult:
    """The final line of a response; ``error`` is the CME/CMS number when there is one."""

    code: ResultCode
    error: int | None = None

    @property
    def ok(self) -> bool:
        """True for ``OK``."""
        return self.code is ResultCode.OK

    def encode(self) -> bytes:
        """The line as a modem sends it."""
        if self.error is None:
            return self.code.value.encode("ascii") + b"\r\n"
        return f"{self.code.value}: {self.error}\r\n".encode("ascii")


@dataclass(frozen=True, slots=True)
class AtResponse:
    """The answer to one command: its intermediate lines and its final result code."""

    lines: tuple[str, ...]
    result: AtResult


@dataclass(frozen=True, slots=True)
class AtUrc:
    """An unsolicited result code (a registration change, a SIM event, a reboot)."""

    line: str

    @property
    def is_ready(self) -> bool:
        """The modem says it has just booted."""
        return self.line == READY_URC


AtFrame = AtResponse | AtUrc


def parse_result(line: str) -> AtResult | None:
    """The final result code a whole line is, or None."""
    if line == "OK":
        return AtResult(ResultCode.OK)
    if line == "ERROR":
        return AtResult(ResultCode.ERROR)
    match = _CME.fullmatch(line)
    if match is None:
        return None
    code = ResultCode.CME_ERROR if match.group(1) == "CME" else ResultCode.CMS_ERROR
    return AtResult(code, int(match.group(2)))


def is_urc(line: str) -> bool:
    """Whether a line is an unsolicited result code."""
    return line == READY_URC or line.startswith(URC_PREFIXES)


def quote(text: str) -> str:
    """An AT string parameter: ``"text"``; ValueError for text an AT string cannot carry."""
    if '"' in text:
        raise ValueError('an AT string parameter cannot contain a double quote (")')
    if not text.isascii():
        raise ValueError("an AT string parameter must be ASCII")
    return f'"{text}"'


def encode_command(text: str, *, max_line: int = AT_HOST_MAX_LINE_BYTES) -> bytes:
    """One command line with its terminator; ValueError when it is not ASCII or too long."""
    if not text.isascii():
        raise ValueError(f"AT command {text[:24]!r}... is not ASCII")
    if not text[:2].upper() == "AT":
        raise ValueError(f"an AT command starts with AT, not {text[:8]!r}")
    data = text.encode("ascii") + COMMAND_TERMINATOR
    if len(data) > max_line:
        raise ValueError(
            f"AT command line of {len(data)} bytes exceeds the {max_line}-byte line limit ({text[:20]}...)"
        )
    return data


def split_params(text: str) -> list[str]:
    """Split ``a,"b,c",d`` at commas outside quotes; quoted values lose their quotes."""
    params: list[str] = []
    current: list[str] = []
    in_quote = False
    quoted = False
    for char in text:
        if char == '"':
            in_quote = not in_quote
            quoted = True
        elif char == "," and not in_quote:
            params.append("".join(current) if quoted else "".join(current).strip())
            current, quoted = [], False
        else:
            current.append(char)
    if in_quote:
        raise ValueError(f"unterminated quoted string in {text[:40]!r}")
    params.append("".join(current) if quoted else "".join(current).strip())
    return params


def _printable(raw: bytes, *, quoted_content: bool) -> bool:
    # Tab and, inside quotes, CR/LF are content; anything else below 0x20 or above 0x7E is noise.
    allowed_controls = b"\t\r\n" if quoted_content else b"\t"
    return all(0x20 <= b <= 0x7E or b in allowed_controls for b in raw)


@dataclass
class AtDecoder:
    """Modem-to-host bytes → ``AtResponse`` / ``AtUrc`` (see the module docstring)."""

    max_line: int = HOST_MAX_LINE_BYTES
    stats: DecoderStats = field(default_factory=DecoderStats)
    urcs: int = 0
    echoes: int = 0
    _buffer: bytearray = field(default_factory=bytearray)
    # A logical line whose quoted string is still open (physical lines so far, raw).
    _open: bytearray | None = None
    _lines: list[str] = field(default_factory=list)
    _errors_seen: int = 0
    _skipping: bool = False

    def feed(self, data: bytes) -> list[AtFrame]:
        """Add received bytes; return every response and URC completed by them, in order."""
        self._buffer += data
        out: list[AtFrame] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) + len(self._open or b"") > self.max_line:
                    self._oversize()
                break
            physical = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False  # the rest of an oversize line
                self.stats.garbage_bytes += len(physical)
                continue
            if len(physical) + len(self._open or b"") > self.max_line:
                # A whole line longer than the cap arrived at once: dropped like one arriving slowly.
                self.stats.oversize += 1
                self._errors_seen += 1
                self.stats.garbage_bytes += len(physical) + len(self._open or b"")
                self._open = None
                continue
            self._physical(physical, out)
        return out

    def _oversize(self) -> None:
        self.stats.oversize += 1
        self._errors_seen += 1
        self.stats.garbage_bytes += len(self._buffer) + len(self._open or b"")
        self._buffer.clear()
        self._open = None
        self._skipping = True

    def _physical(self, physical: bytes, out: list[AtFrame]) -> None:
        if self._open is not None:
            stripped = physical.strip(b"\r\n")
            if _printable(stripped, quoted_content=False) and parse_result(stripped.decode("ascii")):
                # A final result code cannot be quoted content: the open quote was a truncated line.
                self._malformed(len(self._open))
                self._open = None
            else:
                self._open += physical
                if len(self._open) > self.max_line:
                    self._oversize()
                    self._skipping = False
                    return
                if self._open.count(b'"') % 2:
                    return
                logical, self._open = bytes(self._open), None
                self._logical(logical, out)
                return
        if physical.count(b'"') % 2:
            self._open = bytearray(physical)
            return
        self._logical(physical, out)

    def _logical(self, raw: bytes, out: list[AtFrame]) -> None:
        body = raw.strip(b"\r\n")
        if not body.strip():
            return
        if not _printable(body, quoted_content=b'"' in body):
            self._malformed(len(raw))
            return
        line = body.decode("ascii")
        result = parse_result(line)
        if result is not None:
            self.stats.frames += 1
            out.append(AtResponse(tuple(self._lines), result))
            self._lines = []
        elif is_urc(line):
            if line == READY_URC and self._lines:
                # The modem rebooted: the lines before answer nothing any more.
                self._malformed(sum(len(x) for x in self._lines))
                self._lines = []
            self.urcs += 1
            self.stats.frames += 1
            out.append(AtUrc(line))
        elif line[:2].upper() == "AT":
            self.echoes += 1  # our own command, echoed back (ATE1)
        else:
            self._lines.append(line)

    def _malformed(self, size: int) -> None:
        self.stats.malformed += 1
        self.stats.garbage_bytes += size
        self._errors_seen += 1

    def take_errors(self) -> int:
        """Return and reset how many garbled or oversize lines arrived."""
        count, self._errors_seen = self._errors_seen, 0
        return count

    def flush(self) -> int:
        """Drop a half-received line and the intermediate lines so far; return the bytes dropped."""
        dropped = len(self._buffer) + len(self._open or b"") + sum(len(x) for x in self._lines)
        self.stats.garbage_bytes += dropped
        self._buffer.clear()
        self._open = None
        self._lines = []
        self._skipping = False
        return dropped

    @property
    def buffered(self) -> int:
        """Bytes held for unfinished lines."""
        return len(self._buffer) + len(self._open or b"")


# The command decoder's marker for a line that overflowed the modem's buffer.
OVERFLOW = "\x00overflow"


@dataclass
class AtCommandDecoder:
    """Host-to-modem bytes → command lines (the modem's side; the simulator uses it).

    A line ends at CR or LF outside quotes (inside quotes both are content, as in a PEM written
    with ``%CMNG``); empty lines are skipped. A line longer than ``max_line`` yields ``OVERFLOW``
    once its terminator arrives, as the AT host answers ERROR to a command it could not hold.
    """

    max_line: int = AT_HOST_MAX_LINE_BYTES
    _line: bytearray = field(default_factory=bytearray)
    _in_quote: bool = False
    _overflowed: bool = False

    def feed(self, data: bytes) -> list[str]:
        """Add received bytes; return every completed command line (or ``OVERFLOW``)."""
        commands: list[str] = []
        for byte in data:
            if byte == 0x22:
                self._in_quote = not self._in_quote
            elif byte in (0x0D, 0x0A) and not self._in_quote:
                if self._overflowed:
                    commands.append(OVERFLOW)
                elif self._line:
                    commands.append(self._line.decode("ascii", "replace"))
                self._line.clear()
                self._overflowed = False
                continue
            if self._overflowed:
                continue
            # The terminator counts against the buffer too.
            if len(self._line) + len(COMMAND_TERMINATOR) >= self.max_line:
                self._overflowed = True
                self._line.clear()
                continue
            self._line.append(byte)
        return commands
