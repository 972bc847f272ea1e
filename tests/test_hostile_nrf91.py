"""Hostile nRF91 modems (AT interface): every trick is refused with a reason, costs no ID, crashes nothing.

The simulated modem behind a real PTY answers the production client with bent lines: an IMEI that
fails its check digit or is not digits at all, an IMEI that changes when the job restarts, answers
that never end their line, a line far longer than any AT buffer, a spray of binary junk lines, a
%KEYGEN whose COSE_Sign1 is a CBOR nesting bomb or not base64 at all. The real station runs it;
afterwards the ledger holds no provisioned device and no reservation for tricks before the
reservation (identification), and the one reservation, bound to the modem's IMEI, for a trick after it.
"""

from __future__ import annotations

import base64
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from factoryd.ledger.model import DeviceState
from factoryd.protocol.nrf91 import luhn_ok
from factoryd.sim.nrf91 import ModemAnswer, Nrf91PtyModem, SimNrf91Modem
from tests.helpers.station import LOT, Line, make_line

CBOR_BOMB = b"\x81" * 3000 + b"\x00"
# An answer that never ends its line: far past the host decoder's 8 KiB line cap.
UNTERMINATED_BYTES = 64 * 1024
OVERSIZE_LINE_BYTES = 100 * 1024
JUNK_LINES = 500
PEAK_BYTES = 32 * 1024 * 1024


def _bad_check_digit(imei: str) -> str:
    return imei[:-1] + str((int(imei[-1]) + 1) % 10)


def _other_imei(imei: str) -> str:
    """Another well-formed IMEI (same TAC, other serial, a valid check digit)."""
    body = imei[:8] + f"{(int(imei[8:14]) + 1) % 1_000_000:06d}"
    for digit in "0123456789":
        if luhn_ok(body + digit):
            return body + digit
    raise AssertionError("no check digit")


class HostileModem(SimNrf91Modem):
    """A simulated nRF91 modem whose answers to ``armed`` commands are bent by ``trick``."""

    def __init__(self, trick: str, armed: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.trick = trick
        self.armed = armed
        self.bent = 0
        self.imei_reads = 0

    async def execute(self, line: str) -> ModemAnswer:
        """The honest answer, then bent."""
        upper = line.strip().upper()
        if upper.startswith("AT+CGSN"):
            self.imei_reads += 1
        if self.trick == "changing_imei" and upper.startswith("AT%KEYGEN") and self.imei_reads < 2:
            self.bent += 1
            self.hanging = True  # no answer: the pipeline restarts the job and reads the IMEI again
        answer = await super().execute(line)
        if not upper.startswith(self.armed):
            return answer
        match self.trick:
            case "bad_check_digit":
                self.bent += 1
                return ModemAnswer(
                    tuple(_bad_check_digit(x) if x.isdigit() else x for x in answer.lines), "OK"
                )
            case "not_digits":
                self.bent += 1
                return ModemAnswer(("35ABCDEF0123456",), "OK")
            case "changing_imei" if self.imei_reads >= 2:
                self.bent += 1
                return ModemAnswer(tuple(_other_imei(x) if x.isdigit() else x for x in answer.lines), "OK")
            case "cose_bomb" if answer.lines:
                self.bent += 1
                text = answer.lines[0]
                csr = text.split('"')[1].split(".")[0]
                bomb = base64.urlsafe_b64encode(CBOR_BOMB).rstrip(b"=").decode()
                return ModemAnswer((f'%KEYGEN: "{csr}.{bomb}"',), "OK")
            case "not_base64":
                self.bent += 1
                return ModemAnswer(('%KEYGEN: "!!!not*base64!!!.???"',), "OK")
        return answer

    def open_pty(self) -> Nrf91PtyModem:
        """A PTY that sends the armed answers unterminated, oversized or after junk lines."""
        return _HostilePty(self)


class _HostilePty(Nrf91PtyModem):
    board: HostileModem

    async def _handle(self, item: object) -> None:
        board = self.board
        if isinstance(item, str) and getattr(board, "hanging", False):
            board.hanging = False
            return
        if not (isinstance(item, str) and item.strip().upper().startswith(board.armed)):
            await super()._handle(item)
            return
        match board.trick:
            case "unterminated":
                board.bent += 1
                await self._send(b"3" * UNTERMINATED_BYTES)  # never a CR or LF
                return
            case "oversize_line":
                board.bent += 1
                await self._send(b"%KEYGEN: " + b"A" * OVERSIZE_LINE_BYTES + b"\r\nOK\r\n")
                return
            case "junk_flood":
                board.bent += 1
                await self._send(bytes(range(0x80, 0xFF)) * 2 + b"\r\n" * 1)
                for _ in range(JUNK_LINES):
                    await self._send(b"\xff\xfe\x00\x01\x9c junk \x80\r\n")
        await super()._handle(item)


async def _run(
    tmp_path: Path, make: Callable[[], HostileModem], *, measure: bool = False
) -> tuple[Line, HostileModem, str, int]:
    line = await make_line(tmp_path, profile="nrf91-at", flash=False)
    modem = make()
    hub = line.hub(ports=1, supply=0)
    hub.insert("1", modem)
    if measure:
        tracemalloc.start()
    try:
        station = await line.run(hub, timeout_s=120)
        peak = tracemalloc.get_traced_memory()[1] if measure else 0
    finally:
        if measure:
            tracemalloc.stop()
    assert len(station.results) == 1, station.results
    result = station.results[0]
    assert result.outcome in ("failed", "refused"), result
    assert result.reason is not None
    assert modem.bent > 0, "the trick never fired"
    assert modem.stored_certificate() is None or result.device_id is not None
    return line, modem, result.reason, peak


def _no_id_consumed(line: Line) -> None:
    with line.ledger() as ledger:
        progress = ledger.progress(LOT)
        assert (progress.provisioned, progress.reserved, progress.void) == (0, 0, 0), progress
        ledger.verify_audit()


def _reservation_kept(line: Line, modem: SimNrf91Modem) -> None:
    with line.ledger() as ledger:
        progress = ledger.progress(LOT)
        assert (progress.provisioned, progress.reserved, progress.void) == (0, 1, 0), progress
        record = ledger.find_by_serial(LOT, modem.serial_text)
        assert record is not None
        assert record.state is DeviceState.RESERVED  # bound to this modem: a re-insert resumes it
        ledger.verify_audit()


@pytest.mark.parametrize(
    ("trick", "reasons"),
    [
        ("bad_check_digit", {"protocol_violation"}),
        ("not_digits", {"protocol_violation"}),
        ("unterminated", {"board_timeout", "protocol_violation", "frame"}),
    ],
)
async def test_lying_or_broken_imei_answer_gets_no_id(tmp_path: Path, trick: str, reasons: set[str]) -> None:
    line, _, reason, _ = await _run(tmp_path, lambda: HostileModem(trick, "AT+CGSN"))
    assert reason in reasons
    _no_id_consumed(line)


async def test_imei_that_changes_on_the_restart_is_refused_and_the_reservation_kept(tmp_path: Path) -> None:
    line, modem, reason, _ = await _run(tmp_path, lambda: HostileModem("changing_imei", "AT+CGSN"))
    assert reason == "identity_mismatch"
    assert modem.imei_reads >= 2
    _reservation_kept(line, modem)


@pytest.mark.parametrize(
    ("trick", "reasons"),
    [
        ("cose_bomb", {"protocol_violation", "attestation_signature", "csr_rejected"}),
        ("not_base64", {"protocol_violation"}),
        ("oversize_line", {"board_timeout", "protocol_violation", "frame"}),
    ],
)
async def test_bent_keygen_answer_is_refused_and_the_reservation_kept(
    tmp_path: Path, trick: str, reasons: set[str]
) -> None:
    line, modem, reason, _ = await _run(tmp_path, lambda: HostileModem(trick, "AT%KEYGEN"))
    assert reason in reasons
    _reservation_kept(line, modem)


async def test_junk_flood_costs_bounded_memory_and_no_id(tmp_path: Path) -> None:
    line, _, reason, peak = await _run(tmp_path, lambda: HostileModem("junk_flood", "AT+CGSN"), measure=True)
    assert reason in {"board_flood", "protocol_violation", "board_timeout", "frame"}
    assert peak < PEAK_BYTES
    _no_id_consumed(line)
