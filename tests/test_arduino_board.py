"""ArduinoClient against the simulated provisioning sketch over real PTYs: every command, every fault."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import re
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from factoryd.errors import (
    BoardStatusError,
    BoardTimeoutError,
    LinkClosedError,
    LinkOpenError,
    ProtocolViolationError,
)
from factoryd.pki.arduino import arduino_pack_dates
from factoryd.protocol.arduino import ArduinoClient, ArduinoCommand, ArduinoTimeouts
from factoryd.sim.arduino import (
    COMPRESSED_CERT_SLOT,
    DEVICE_ID_SLOT,
    SERIAL_AKI_SLOT,
    ArduinoPtyBoard,
    SimArduinoBoard,
    serve_arduino_pty,
)
from factoryd.sim.board import Fault, FaultPlan, Timing
from factoryd.transport.arduino_framing import ArduinoFrame, FrameType, ResponseCode

DEVICE_ID = "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b"
FAST = ArduinoTimeouts(
    get_csr_s=0.3,
    begin_storage_s=0.2,
    set_field_s=0.2,
    end_storage_s=0.2,
    reconstruct_s=0.2,
    sketch_info_s=0.2,
    late_reply_s=0.05,
)
SERIAL16 = bytes(range(1, 17))
AKI20 = bytes(range(100, 120))
SIGNATURE64 = b"\x11" * 32 + b"\x22" * 32


@contextlib.asynccontextmanager
async def arduino(
    board: SimArduinoBoard | None = None, timeouts: ArduinoTimeouts = FAST
) -> AsyncIterator[tuple[ArduinoPtyBoard, ArduinoClient]]:
    """A simulated sketch behind a PTY and a client on the production serial path."""
    async with (
        serve_arduino_pty(board or SimArduinoBoard()) as pty,
        await ArduinoClient.open(pty.path, timeouts=timeouts) as client,
    ):
        yield pty, client


def once(fault: Fault) -> FaultPlan:
    """The fault fires once, at one of the board's first few opportunities."""
    return dataclasses.replace(FaultPlan.only(fault), per_power_on=True)


async def store_fields(client: ArduinoClient) -> None:
    await client.begin_storage()
    await client.set_year(2024)
    await client.set_month(3)
    await client.set_day(7)
    await client.set_hour(14)
    await client.set_validity(31)
    await client.set_cert_serial(SERIAL16)
    await client.set_auth_key(AKI20)
    await client.set_signature(SIGNATURE64)
    await client.end_storage()


async def test_every_command() -> None:
    board = SimArduinoBoard()
    async with arduino(board) as (pty, client):
        await client.sketch_info()
        first = x509.load_pem_x509_csr(await client.get_csr(DEVICE_ID))
        second = x509.load_pem_x509_csr(await client.get_csr(DEVICE_ID))
        for csr in (first, second):
            assert csr.is_signature_valid
            assert csr.subject.rfc4514_string() == f"CN={DEVICE_ID}"
            assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
        # Every GetCSR makes a new key; the slot holds the last one.
        assert board.csr_count == 2
        assert first.public_key() != second.public_key()
        slot_key = board.se.public_point(0)
        assert second.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) == slot_key
        await store_fields(client)
        assert board.data_slots[DEVICE_ID_SLOT] == DEVICE_ID.encode() + bytes(72 - 36)
        assert board.data_slots[COMPRESSED_CERT_SLOT] == (
            SIGNATURE64 + arduino_pack_dates(2024, 3, 7, 14, 31) + bytes(5)
        )
        assert board.data_slots[SERIAL_AKI_SLOT] == SERIAL16 + AKI20
        await client.reconstruct_cert()
        rebuilt = board.rebuilt_certificate()
        assert rebuilt is not None
        cert = x509.load_der_x509_certificate(rebuilt)
        assert cert.subject.rfc4514_string() == f"CN={DEVICE_ID}"
        assert cert.issuer.rfc4514_string() == "CN=Arduino,OU=IT,O=Arduino LLC US,C=US"
        assert cert.serial_number == int.from_bytes(SERIAL16, "big")
        assert cert.not_valid_before_utc == dt.datetime(2024, 3, 7, 14, tzinfo=dt.UTC)
        assert cert.not_valid_after_utc == dt.datetime(2055, 3, 7, 14, tzinfo=dt.UTC)
        assert cert.public_key() == second.public_key()
        assert board.config_locked
        assert client.pending == 0
        assert client.stats.requests == 14
        assert client.stats.resends == 0
        assert not pty.hung


async def test_board_refuses_bad_arguments_and_ignores_unanswered_commands() -> None:
    board = SimArduinoBoard()

    async def code(command: int, args: bytes = b"") -> ResponseCode | None:
        reply = await board.answer(ArduinoFrame(FrameType.COMMAND, bytes([command]) + args))
        return None if reply is None else reply.response_code

    assert await code(ArduinoCommand.SET_CERT_SERIAL, b"s" * 15) is ResponseCode.ERROR
    assert await code(ArduinoCommand.SET_CERT_SERIAL, b"s" * 16) is ResponseCode.ACK
    assert await code(ArduinoCommand.SET_AUTH_KEY, b"a" * 19) is ResponseCode.ERROR
    assert await code(ArduinoCommand.SET_SIGNATURE, b"s" * 63) is ResponseCode.ERROR
    assert await code(ArduinoCommand.SET_YEAR, b"20x4") is ResponseCode.ERROR
    assert await code(ArduinoCommand.SET_YEAR, b"2024") is ResponseCode.ACK
    for silent in (3, 4, 5, 7, 99):
        assert await code(silent) is None
    # GetCSR with an ID that is not 36 bytes: the sketch fails, and then it never answers.
    assert await code(ArduinoCommand.GET_CSR, DEVICE_ID[:35].encode()) is None
    assert await board.answer(ArduinoFrame.data(b"\x02")) is None
    assert board.csr_count == 0


async def test_storage_errors_name_the_command() -> None:
    async with arduino() as (_, client):
        with pytest.raises(BoardStatusError, match="BEGIN_STORAGE refused"):
            await client.begin_storage()  # no GetCSR yet: the sketch has no ID in RAM
        with pytest.raises(BoardStatusError, match="RECONSTRUCT_CERT refused"):
            await client.reconstruct_cert()  # nothing stored
        await client.get_csr(DEVICE_ID)
        await client.begin_storage()
        await client.set_year(2024)
        with pytest.raises(BoardStatusError, match=r"END_STORAGE refused .*: ERROR") as caught:
            await client.end_storage()  # fields missing
        assert caught.value.status == ResponseCode.ERROR
        assert client.pending == 0


async def test_client_refuses_bad_arguments_before_sending() -> None:
    async with arduino() as (_, client):
        with pytest.raises(ValueError, match="36 printable ASCII"):
            await client.get_csr("short-id")
        with pytest.raises(ValueError, match="36 printable ASCII"):
            await client.get_csr("é" * 36)
        with pytest.raises(ValueError, match="serial must be exactly 16 bytes"):
            await client.set_cert_serial(b"s" * 15)
        with pytest.raises(ValueError, match=r"year must be within 2000..2031"):
            await client.set_year(2032)
        with pytest.raises(ValueError, match="validity years"):
            await client.set_validity(32)
        assert client.stats.requests == 0


@pytest.mark.parametrize("fault", [Fault.CORRUPT_BYTE, Fault.DROP_REPLY])
async def test_single_fault_is_resent_and_succeeds(fault: Fault) -> None:
    board = SimArduinoBoard(faults=once(fault))
    async with arduino(board) as (_, client):
        for _ in range(6):
            await client.sketch_info()
        assert board.injected == {fault: 1}
        assert client.stats.resends == 1
        assert client.pending == 0


async def test_corrupted_csr_reply_is_asked_again_and_matches_the_new_key() -> None:
    board = SimArduinoBoard(faults=FaultPlan.only(Fault.CORRUPT_BYTE))
    original = board.fault
    left = [1]

    def first_reply_only(kind: Fault) -> bool:
        # Exactly the first CSR reply is garbled (a per-power-on plan may pick a later one).
        if kind is Fault.CORRUPT_BYTE and left[0]:
            left[0] -= 1
            return original(kind)
        return False

    board.fault = first_reply_only  # type: ignore[method-assign]
    async with arduino(board) as (_, client):
        csr = x509.load_pem_x509_csr(await client.get_csr(DEVICE_ID))
        # The resend made a second key; the CSR we kept is for the key now in the slot.
        assert board.csr_count == 2
        assert csr.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) == (
            board.se.public_point(0)
        )
        assert client.stats.frame_errors == 1


async def test_every_reply_garbled_is_a_protocol_violation() -> None:
    board = SimArduinoBoard(faults=FaultPlan.only(Fault.CORRUPT_BYTE))
    async with arduino(board) as (_, client):
        with pytest.raises(ProtocolViolationError, match=r"SKETCH_INFO .* 4 garbled replies"):
            await client.sketch_info()
        assert client.pending == 0


async def test_every_reply_dropped_times_out_after_resends() -> None:
    board = SimArduinoBoard(faults=FaultPlan.only(Fault.DROP_REPLY))
    async with arduino(board) as (_, client):
        with pytest.raises(BoardTimeoutError, match=r"SET_YEAR .* no reply after 4 attempts"):
            await client.set_year(2024)
        assert client.stats.resends == 3
        assert client.stats.timeouts == 1
        assert client.pending == 0


async def test_nack_is_resent_and_persistent_nack_fails() -> None:
    board = SimArduinoBoard()
    async with arduino(board) as (_, client):
        board.garble_requests = 1
        await client.sketch_info()
        assert client.stats.nacks == 1
        assert client.stats.resends == 1
        board.garble_requests = 10
        with pytest.raises(ProtocolViolationError, match="NACKed 4 times"):
            await client.sketch_info()
        assert client.pending == 0


async def test_hang_is_a_timeout() -> None:
    board = SimArduinoBoard(faults=FaultPlan.only(Fault.HANG))
    async with arduino(board) as (pty, client):
        with pytest.raises(BoardTimeoutError):
            await client.set_month(3)
        assert pty.hung
        assert client.pending == 0


async def test_board_that_never_answers_get_csr_times_out_without_resending() -> None:
    board = SimArduinoBoard(csr_never_answers=True)
    async with arduino(board) as (_, client):
        with pytest.raises(BoardTimeoutError, match=r"GET_CSR .* no reply after 1 attempt "):
            await client.get_csr(DEVICE_ID)
        assert client.stats.resends == 0
        assert client.pending == 0
        board.csr_never_answers = False
        assert b"BEGIN CERTIFICATE REQUEST" in await client.get_csr(DEVICE_ID)


async def test_late_reply_is_not_taken_for_the_next_request() -> None:
    # The CSR comes after the host gave up: without the quiet period it would answer SKETCH_INFO.
    board = SimArduinoBoard(timing=Timing(csr_s=0.6))
    timeouts = dataclasses.replace(FAST, late_reply_s=0.8)
    async with arduino(board, timeouts) as (_, client):
        with pytest.raises(BoardTimeoutError):
            await client.get_csr(DEVICE_ID)
        await client.sketch_info()
        assert client.stats.late_replies_dropped == 1
        assert client.pending == 0


async def test_boot_garbage_is_skipped() -> None:
    # The board boots once the host has the port open (the host's open flushes earlier bytes).
    board = SimArduinoBoard(faults=FaultPlan.only(Fault.BOOT_GARBAGE), timing=Timing(boot_s=0.1))
    async with arduino(board) as (_, client):
        await client.sketch_info()
        assert board.injected == {Fault.BOOT_GARBAGE: 1}
        assert client.link.decoder.stats.garbage_bytes > 0


async def test_unplugged_board_fails_the_pending_request() -> None:
    board = SimArduinoBoard(csr_never_answers=True)
    async with arduino(board) as (pty, client):
        request = asyncio.ensure_future(client.get_csr(DEVICE_ID))
        await asyncio.sleep(0.05)
        pty.close()
        with pytest.raises(LinkClosedError):
            await request
        assert client.pending == 0
        with pytest.raises(LinkClosedError):
            await client.sketch_info()


async def test_open_missing_tty_names_path() -> None:
    with pytest.raises(LinkOpenError, match="/dev/nonexistent-arduino"):
        await ArduinoClient.open("/dev/nonexistent-arduino")


async def test_usb_serial_and_pty_surface() -> None:
    first, second = SimArduinoBoard(), SimArduinoBoard()
    assert re.fullmatch(r"[0-9A-F]{32}", first.usb_serial)
    assert first.usb_serial != second.usb_serial
    assert SimArduinoBoard(usb_serial="").usb_serial == ""
    runner = first.open_pty()
    try:
        assert runner.path.startswith("/dev/")
        assert runner.hung is False
        assert runner.board is first
    finally:
        runner.close()
    runner.close()  # idempotent
