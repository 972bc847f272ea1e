"""The SMP console framer: Zephyr's line framing, byte at a time, noise between frames; smp as oracle."""

from __future__ import annotations

import base64

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from smp import packet as smp_packet
from smp.os_management import EchoWriteRequest

from factoryd.errors import CrcError
from factoryd.transport.smp_framing import (
    MAX_LINE_BYTES,
    MAX_PENDING_LINE_BYTES,
    SmpDecoder,
    SmpFramingError,
    SmpOp,
    SmpPacket,
    console_bytes,
    crc16_xmodem,
    decode_console,
    encode_console,
)

# MCUBOOT_SMP.md: echo "hi", SMP v2 write, seq 0.
ECHO_HI = b"\x06\x09ABAKAAAGAAAAAKFhZGJoaeJ8\n"


def packet(size: int = 40, seq: int = 7) -> SmpPacket:
    return SmpPacket(
        SmpOp.WRITE, 1, seq, 1, cbor2.dumps({"data": bytes(range(256)) * (size // 256) + bytes(size % 256)})
    )


def test_crc16_xmodem_check_value() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3


def test_the_fact_sheets_echo_frame_decodes_exactly() -> None:
    decoded = decode_console(ECHO_HI)
    assert decoded == SmpPacket(SmpOp.WRITE, group=0, seq=0, command=0, payload=cbor2.dumps({"d": "hi"}))
    assert decoded.version == 1
    assert decoded.lines() == ECHO_HI
    # The smp package builds the same packet for the same request.
    assert bytes(EchoWriteRequest(d="hi", sequence=0)) == decoded.encode()


def test_header_is_eight_bytes_big_endian() -> None:
    raw = SmpPacket(SmpOp.READ_RSP, group=0x4644, seq=0xAB, command=3, payload=b"\xa0").encode()
    assert raw == bytes([0x08 | 1, 0, 0, 1, 0x46, 0x44, 0xAB, 3, 0xA0])
    assert SmpPacket.decode(raw).op is SmpOp.READ_RSP


def test_header_length_must_match_the_body() -> None:
    raw = SmpPacket(SmpOp.WRITE, 0, 1, 0, b"\xa0\xa0").encode()
    with pytest.raises(SmpFramingError, match="2 body bytes"):
        SmpPacket.decode(raw[:-1] + b"")  # 1 byte shorter than the header says
    with pytest.raises(SmpFramingError, match="shorter than its 8-byte header"):
        SmpPacket.decode(raw[:5])


def test_unknown_op_maps_to_unknown() -> None:
    raw = bytearray(SmpPacket(SmpOp.WRITE, 0, 1, 0).encode())
    raw[0] = 0x0E  # op 6
    assert SmpPacket.decode(bytes(raw)).op is SmpOp.UNKNOWN


def test_lines_are_at_most_127_bytes_cut_at_multiples_of_four() -> None:
    data = packet(1000).lines()
    lines = data.split(b"\n")[:-1]
    assert len(lines) > 5
    assert lines[0].startswith(b"\x06\x09")
    assert all(line.startswith(b"\x04\x14") for line in lines[1:])
    assert max(len(line) + 1 for line in lines) == MAX_LINE_BYTES
    assert all((len(line) - 2) % 4 == 0 for line in lines)
    assert console_bytes(len(packet(1000).encode())) == len(data)


def test_our_lines_equal_the_smp_packages_and_it_decodes_them() -> None:
    pkt = packet(700)
    # smp.packet.encode(line_length=128) packs 124 characters per line, as Zephyr's console does.
    assert pkt.lines() == b"".join(smp_packet.encode(pkt.encode(), line_length=128))
    decoder = smp_packet.decode()
    next(decoder)
    lines = pkt.lines().splitlines(keepends=True)
    for line in lines[:-1]:
        decoder.send(line)
    with pytest.raises(StopIteration) as done:
        decoder.send(lines[-1])
    assert done.value.value == pkt.encode()


def test_byte_at_a_time() -> None:
    frames = [packet(300, seq=s) for s in range(3)]
    decoder = SmpDecoder()
    out: list[SmpPacket] = []
    for byte in b"".join(f.lines() for f in frames):
        out += decoder.feed(bytes([byte]))
    assert out == frames
    assert decoder.stats.frames == 3
    assert decoder.take_errors() == 0


def test_log_lines_and_garbage_between_frames_and_between_lines_of_a_frame() -> None:
    one, two = packet(400, seq=1), packet(20, seq=2)
    lines = one.lines().splitlines(keepends=True)
    stream = (
        b"*** Booting Zephyr OS build v3.7.0 ***\r\n"
        + lines[0]
        + b"[00:00:00.004,000] <inf> app: started\r\n"  # a log line inside the frame
        + b"".join(lines[1:])
        + b"\x00\xff\x06garbage without a newline "
        + two.lines()
    )
    decoder = SmpDecoder()
    assert decoder.feed(stream) == [one, two]
    assert decoder.take_errors() == 0
    assert decoder.stats.garbage_bytes > 60


def test_a_corrupted_frame_is_counted_and_the_next_one_decodes() -> None:
    good = packet(200, seq=3)
    bad = bytearray(packet(200, seq=2).lines())
    bad[10] = ord("A") if bad[10] != ord("A") else ord("B")
    decoder = SmpDecoder()
    assert decoder.feed(bytes(bad) + good.lines()) == [good]
    assert decoder.take_errors() == 1
    assert decoder.stats.crc_errors + decoder.stats.malformed == 1


def test_bad_crc_raises_a_typed_error() -> None:
    text = base64.b64encode(b"\x00\x10" + bytes.fromhex("0a00000600000000a16164626869") + b"\x00\x00")
    with pytest.raises(CrcError):
        decode_console(b"\x06\x09" + text + b"\n")


def test_a_frame_cut_short_is_dropped_when_a_new_one_starts() -> None:
    first = packet(500, seq=1).lines().splitlines(keepends=True)
    second = packet(30, seq=2)
    decoder = SmpDecoder()
    assert decoder.feed(b"".join(first[:2]) + second.lines()) == [second]
    assert decoder.take_errors() == 1
    assert decoder.stats.malformed == 1


def test_oversize_length_is_refused_without_buffering() -> None:
    raw = b"\xff\xf0" + bytes(60)
    decoder = SmpDecoder(max_packet=1024)
    assert decoder.feed(b"\x06\x09" + base64.b64encode(raw) + b"\n") == []
    assert decoder.stats.oversize == 1
    assert not decoder.in_frame


def test_bad_base64_and_misaligned_lines_are_malformed() -> None:
    decoder = SmpDecoder()
    assert decoder.feed(b"\x06\x09AB*KAAAG\n\x06\x09ABAKAAA\n") == []
    assert decoder.stats.malformed == 2
    assert decoder.feed(ECHO_HI) != []


def test_pending_line_is_capped_and_a_frame_after_long_noise_still_decodes() -> None:
    decoder = SmpDecoder()
    decoder.feed(b"x" * (MAX_PENDING_LINE_BYTES * 4))
    assert len(decoder._line) <= MAX_PENDING_LINE_BYTES
    assert decoder.feed(b"still the same log line\n" + ECHO_HI) == [decode_console(ECHO_HI)]
    # A frame that follows noise without a newline is found by its marker.
    assert decoder.feed(b"y" * (MAX_PENDING_LINE_BYTES + 10) + ECHO_HI) == [decode_console(ECHO_HI)]


def test_flush_drops_a_half_received_frame() -> None:
    lines = packet(500).lines().splitlines(keepends=True)
    decoder = SmpDecoder()
    decoder.feed(lines[0] + lines[1][:10])
    assert decoder.in_frame
    assert decoder.flush() > 0
    assert not decoder.in_frame
    assert decoder.feed(b"".join(lines[2:])) == []


def test_crlf_line_endings_are_accepted() -> None:
    assert SmpDecoder().feed(ECHO_HI.replace(b"\n", b"\r\n")) == [decode_console(ECHO_HI)]


def test_a_line_must_carry_a_quantum() -> None:
    with pytest.raises(ValueError, match="base64 quantum"):
        encode_console(b"x" * 10, max_line_bytes=6)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(SmpOp)[:4]),
            st.integers(0, 0xFFFF),
            st.integers(0, 0xFF),
            st.integers(0, 0xFF),
            st.binary(max_size=1500),
        ),
        max_size=4,
    ),
    st.lists(st.binary(max_size=40).filter(lambda b: b"\x06\x09" not in b), max_size=5),
    st.integers(1, 97),
)
def test_round_trip_with_noise_in_any_chunking(
    specs: list[tuple[SmpOp, int, int, int, bytes]], noise: list[bytes], chunk: int
) -> None:
    frames = [SmpPacket(op, group, seq, command, body) for op, group, seq, command, body in specs]
    stream = b""
    for i, frame in enumerate(frames):
        # Noise always ends its line before a frame starts (as a log line does).
        stream += (noise[i] + b"\n" if i < len(noise) else b"") + frame.lines()
    decoder = SmpDecoder()
    out: list[SmpPacket] = []
    for i in range(0, len(stream), chunk):
        out += decoder.feed(stream[i : i + chunk])
    assert out == frames


@given(st.binary(max_size=3000), st.integers(1, 200))
def test_random_bytes_never_raise_and_the_buffer_stays_capped(data: bytes, chunk: int) -> None:
    decoder = SmpDecoder()
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
    assert len(decoder._line) <= MAX_PENDING_LINE_BYTES
    # Whatever came before, a complete frame on a fresh line still decodes.
    assert decoder.feed(b"\n" + ECHO_HI)[-1:] == [decode_console(ECHO_HI)]
