"""The arduino-v1 frame codec: CRC, layout, round trips, resynchronisation, caps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from factoryd.protocol.arduino import ArduinoCommand
from factoryd.transport.arduino_framing import (
    BOARD_ACT_BYTES,
    BOARD_BUFFER_BYTES,
    HOST_MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    START,
    ArduinoDecoder,
    ArduinoFrame,
    FrameType,
    ResponseCode,
    crc16_x25,
)


def test_crc_check_value() -> None:
    assert crc16_x25(b"123456789") == 0x906E
    assert crc16_x25(b"") == 0x0000


def test_frame_layout() -> None:
    frame = ArduinoFrame.response(ResponseCode.ACK)
    data = frame.encode()
    crc = crc16_x25(b"\x02")
    assert data == b"\x55\xaa\x03\x00\x03\x02" + crc.to_bytes(2, "big") + b"\xaa\x55"
    # The length field counts payload + CRC.
    command = ArduinoFrame.command(ArduinoCommand.SET_YEAR, b"2024").encode()
    assert command[2] == FrameType.COMMAND
    assert int.from_bytes(command[3:5], "big") == 1 + 4 + 2
    assert command[5:10] == b"\x082024"


def test_unknown_response_code_maps_to_unknown() -> None:
    assert ResponseCode(0x77) is ResponseCode.UNKNOWN
    assert ArduinoFrame(FrameType.RESPONSE, b"\x77").response_code is ResponseCode.UNKNOWN
    assert ArduinoFrame(FrameType.RESPONSE, b"\x02\x02").response_code is None
    assert ArduinoFrame.data(b"\x02").response_code is None


frames_st = st.lists(
    st.builds(ArduinoFrame, st.sampled_from(list(FrameType)), st.binary(max_size=600)), max_size=6
)
# Line noise between frames; a false start marker inside noise is tested separately below.
garbage_st = st.binary(max_size=40).filter(lambda b: START not in b)


@given(frames=frames_st, garbage=st.lists(garbage_st, min_size=7, max_size=7), chunk=st.integers(1, 64))
def test_round_trip_with_garbage_in_any_chunking(
    frames: list[ArduinoFrame], garbage: list[bytes], chunk: int
) -> None:
    stream = b"".join(garbage[i] + f.encode() for i, f in enumerate(frames)) + garbage[-1]
    whole = ArduinoDecoder()
    assert whole.feed(stream) == frames
    assert whole.take_errors() == 0
    pieces = ArduinoDecoder()
    out: list[ArduinoFrame] = []
    for i in range(0, len(stream), chunk):
        out += pieces.feed(stream[i : i + chunk])
    assert out == frames
    # What is left is noise too short for the decoder to look at yet (less than a frame).
    assert pieces.buffered < MIN_FRAME_BYTES


@given(frames=frames_st)
def test_one_byte_at_a_time(frames: list[ArduinoFrame]) -> None:
    decoder = ArduinoDecoder()
    out: list[ArduinoFrame] = []
    for byte in b"".join(f.encode() for f in frames):
        out += decoder.feed(bytes([byte]))
    assert out == frames
    assert decoder.stats.frames == len(frames)


def test_crc_error_is_dropped_and_counted_then_next_frame_decodes() -> None:
    good = ArduinoFrame.response(ResponseCode.ACK).encode()
    bad = bytearray(ArduinoFrame.data(b"hello").encode())
    bad[6] ^= 0x01
    decoder = ArduinoDecoder()
    assert decoder.feed(bytes(bad) + good) == [ArduinoFrame.response(ResponseCode.ACK)]
    assert decoder.stats.crc_errors == 1
    assert decoder.take_errors() == 1
    assert decoder.take_errors() == 0


@pytest.mark.parametrize(
    "false_start",
    [
        b"\x55\xaa\x03\xff\xff",  # length beyond any cap
        b"\x55\xaa\x03\x00\x01",  # length shorter than the CRC
        b"\x55\xaa\x02\x00\x04zz\x00\x00\x00\x00",  # length fits, end marker missing
    ],
)
def test_resynchronises_after_false_start_marker(false_start: bytes) -> None:
    frame = ArduinoFrame.data(b"-----BEGIN CERTIFICATE REQUEST-----")
    decoder = ArduinoDecoder()
    assert decoder.feed(b"noise" + false_start + frame.encode()) == [frame]
    assert decoder.take_errors() >= 1


def test_unknown_frame_type_with_valid_crc_is_dropped() -> None:
    raw = bytearray(ArduinoFrame.data(b"x").encode())
    raw[2] = 9
    decoder = ArduinoDecoder()
    assert decoder.feed(bytes(raw)) == []
    assert decoder.stats.malformed == 1


def test_buffer_is_capped() -> None:
    decoder = ArduinoDecoder()
    # Noise without a start marker is never kept.
    decoder.feed(bytes(range(0x56, 0xFF)) * 40)
    assert decoder.buffered == 0
    # A header asking for more than the cap is refused at once instead of buffered.
    decoder.feed(b"\x55\xaa\x02" + (HOST_MAX_FRAME_BYTES).to_bytes(2, "big") + b"x" * 100)
    assert decoder.stats.oversize == 1
    assert decoder.buffered < 100
    # A frame right at the cap still decodes (a long PEM CSR data frame).
    big = ArduinoFrame.data(b"P" * (HOST_MAX_FRAME_BYTES - 9))
    assert len(big.encode()) == HOST_MAX_FRAME_BYTES
    assert decoder.feed(big.encode()) == [big]


def test_flush_drops_a_half_frame() -> None:
    decoder = ArduinoDecoder()
    frame = ArduinoFrame.data(b"abc").encode()
    assert decoder.feed(frame[:7]) == []
    assert decoder.flush() == 7
    assert decoder.buffered == 0
    assert decoder.feed(frame) == [ArduinoFrame.data(b"abc")]


def test_board_side_decoder_buffer_and_ten_byte_threshold() -> None:
    board = ArduinoDecoder(max_frame=BOARD_BUFFER_BYTES, act_at=BOARD_ACT_BYTES)
    fits = ArduinoFrame.command(ArduinoCommand.SET_SIGNATURE, b"s" * (BOARD_BUFFER_BYTES - 10))
    assert len(fits.encode()) == BOARD_BUFFER_BYTES
    assert board.feed(fits.encode()) == [fits]
    too_long = ArduinoFrame.command(ArduinoCommand.SET_SIGNATURE, b"s" * (BOARD_BUFFER_BYTES - 9))
    assert board.feed(too_long.encode()) == []
    assert board.stats.oversize == 1
    assert board.take_errors() == 1
    # An empty-payload frame is 9 bytes: the sketch waits for a tenth byte before it looks.
    empty = ArduinoFrame(FrameType.COMMAND, b"")
    assert len(empty.encode()) == 9
    assert board.feed(empty.encode()) == []
    assert board.feed(b"\x00") == [empty]
