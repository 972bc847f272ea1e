"""The I/O-free frame decoder: byte-at-a-time feeding, garbage between frames, caps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factoryd.errors import CrcError, FrameError
from factoryd.transport.framing import (
    MAX_ENCODED_FRAME,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameKind,
    crc16,
    decode_frame,
)

frames = st.builds(
    Frame,
    kind=st.sampled_from(FrameKind),
    seq=st.integers(0, 0xFFFF),
    command=st.integers(0, 0xFF),
    status=st.integers(0, 0xFF),
    payload=st.binary(max_size=600),
)
# Noise that contains no delimiter, so it cannot swallow the next frame's start.
noise = st.binary(max_size=80).map(lambda b: b.replace(b"\x00", b"\x07"))


def test_crc_check_value() -> None:
    assert crc16(b"123456789") == 0x29B1


@given(frame=frames)
def test_roundtrip_one_byte_at_a_time(frame: Frame) -> None:
    decoder = FrameDecoder()
    out: list[Frame] = []
    for b in frame.encode():
        out += decoder.feed(bytes([b]))
    assert out == [frame]
    assert decoder.buffered == 0


@given(items=st.lists(st.tuples(noise, frames), min_size=1, max_size=8), chunk=st.integers(1, 64))
@settings(max_examples=200)
def test_garbage_between_frames_resyncs(items: list[tuple[bytes, Frame]], chunk: int) -> None:
    # Each frame is preceded by noise and a delimiter, as after boot noise on the line.
    stream = b"".join(junk + b"\x00" + f.encode() for junk, f in items)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(0, len(stream), chunk):
        out += decoder.feed(stream[i : i + chunk])
    assert out == [f for _, f in items]


@given(data=st.binary(max_size=3000))
def test_decoder_never_raises_on_noise(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    assert decoder.buffered <= MAX_ENCODED_FRAME


def test_corrupted_frame_is_counted_and_next_frame_survives() -> None:
    good = Frame(FrameKind.RESPONSE, 7, 1, 0, b"hello")
    bad = bytearray(good.encode())
    bad[3] ^= 0x40
    decoder = FrameDecoder()
    assert decoder.feed(bytes(bad) + good.encode()) == [good]
    assert decoder.stats.crc_errors + decoder.stats.malformed == 1
    assert decoder.take_errors() == 1
    assert decoder.take_errors() == 0


def test_oversize_run_is_dropped_and_buffer_capped() -> None:
    good = Frame(FrameKind.REQUEST, 1, 2, 0, b"x")
    decoder = FrameDecoder()
    assert decoder.feed(b"\x55" * (MAX_ENCODED_FRAME + 100)) == []
    assert decoder.buffered == 0
    assert decoder.stats.oversize == 1
    # The rest of the oversize run is skipped up to its delimiter; then frames decode again.
    assert decoder.feed(b"\x55" * 10 + b"\x00" + good.encode()) == [good]


def test_decode_frame_errors_name_the_problem() -> None:
    with pytest.raises(FrameError, match="shorter"):
        decode_frame(b"\x01\x02")
    raw = bytearray(b"\x01\x01\x00\x01\x01\x00" + b"\x00\x00")
    with pytest.raises(CrcError, match="CRC mismatch"):
        decode_frame(bytes(raw))
    body = b"\x09\x01\x00\x01\x01\x00"
    with pytest.raises(FrameError, match="version 9"):
        decode_frame(body + crc16(body).to_bytes(2, "big"))
    body = b"\x01\x09\x00\x01\x01\x00"
    with pytest.raises(FrameError, match="kind 0x09"):
        decode_frame(body + crc16(body).to_bytes(2, "big"))


def test_payload_limit_enforced_on_encode() -> None:
    with pytest.raises(FrameError, match="MAX_PAYLOAD"):
        Frame(FrameKind.REQUEST, 1, 1, 0, b"x" * (MAX_PAYLOAD + 1)).encode()
    assert Frame(FrameKind.REQUEST, 1, 1, 0, b"x" * MAX_PAYLOAD).encode()
