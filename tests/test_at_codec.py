"""The AT codec: whole lines, URCs aside, quoted multi-line payloads, echo, garbage, caps (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factoryd.transport.at_codec import (
    AT_HOST_MAX_LINE_BYTES,
    OVERFLOW,
    AtCommandDecoder,
    AtDecoder,
    AtResponse,
    AtResult,
    AtUrc,
    ResultCode,
    encode_command,
    parse_result,
    quote,
    split_params,
)

PEM = "-----BEGIN CERTIFICATE-----\r\nMIIBszCCAVmgAwIBAgIUOK\r\nQUFBQUFB\r\n-----END CERTIFICATE-----"
OK = AtResult(ResultCode.OK)


def feed_bytewise(decoder: AtDecoder, data: bytes) -> list[object]:
    out: list[object] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    return out


def test_a_response_is_its_lines_and_its_final_code() -> None:
    decoder = AtDecoder()
    frames = decoder.feed(b"\r\n350624804624867\r\n\r\nOK\r\n")
    assert frames == [AtResponse(("350624804624867",), OK)]


@pytest.mark.parametrize(
    ("line", "result"),
    [
        ("OK", AtResult(ResultCode.OK)),
        ("ERROR", AtResult(ResultCode.ERROR)),
        ("+CME ERROR: 513", AtResult(ResultCode.CME_ERROR, 513)),
        ("+CMS ERROR: 304", AtResult(ResultCode.CMS_ERROR, 304)),
        ("OKAY", None),
        ("%KEYGEN: OK", None),
        ("+CME ERROR: x", None),
    ],
)
def test_final_codes_match_whole_lines_only(line: str, result: AtResult | None) -> None:
    assert parse_result(line) == result


def test_base64_containing_ok_is_not_the_answer() -> None:
    frames = AtDecoder().feed(b'%KEYGEN: "MIIOKaOK.OKOK"\r\nOK\r\n')
    assert frames == [AtResponse(('%KEYGEN: "MIIOKaOK.OKOK"',), OK)]


def test_urcs_between_lines_are_handed_aside() -> None:
    data = b'%CMNG: 1,0,"AA"\r\n+CEREG: 2,"76C1","0102DA04",7\r\n%CMNG: 1,1,"BB"\r\n%XSIM: 1\r\nOK\r\n'
    frames = AtDecoder().feed(data)
    assert frames == [
        AtUrc('+CEREG: 2,"76C1","0102DA04",7'),
        AtUrc("%XSIM: 1"),
        AtResponse(('%CMNG: 1,0,"AA"', '%CMNG: 1,1,"BB"'), OK),
    ]
    assert AtUrc("Ready").is_ready


def test_ready_drops_the_lines_of_an_answer_a_reboot_cut_off() -> None:
    decoder = AtDecoder()
    frames = decoder.feed(b'%CMNG: 1,0,"AA"\r\nReady\r\n350624804624867\r\nOK\r\n')
    assert frames == [AtUrc("Ready"), AtResponse(("350624804624867",), OK)]
    assert decoder.take_errors() == 1


def test_echo_of_our_command_is_dropped_even_over_several_lines() -> None:
    decoder = AtDecoder()
    echo = f'AT%CMNG=0,16842753,0,"{PEM}"\r\n'.encode()
    frames = decoder.feed(echo + b"OK\r\n")
    assert frames == [AtResponse((), OK)]
    assert decoder.echoes == 1


def test_a_quoted_pem_spans_lines_as_one_line() -> None:
    reply = f'%CMNG: 16842753,0,"ABCD","{PEM}"\r\nOK\r\n'.encode()
    frames = AtDecoder().feed(reply)
    assert len(frames) == 1
    assert isinstance(frames[0], AtResponse)
    (line,) = frames[0].lines
    assert split_params(line.removeprefix("%CMNG: "))[3] == PEM


def test_a_truncated_quoted_line_does_not_swallow_the_result_code() -> None:
    decoder = AtDecoder()
    frames = decoder.feed(b'%KEYGEN: "MIIB\r\n+CME ERROR: 523\r\n')
    assert frames == [AtResponse((), AtResult(ResultCode.CME_ERROR, 523))]
    assert decoder.take_errors() == 1


def test_garbage_lines_are_counted_not_answers() -> None:
    decoder = AtDecoder()
    frames = decoder.feed(b"\xff\xfe\x00boot\r\n350624804624867\r\nOK\r\n")
    assert frames == [AtResponse(("350624804624867",), OK)]
    assert decoder.take_errors() == 1
    assert decoder.take_errors() == 0


def test_an_oversize_line_is_dropped_and_the_buffer_stays_capped() -> None:
    decoder = AtDecoder(max_line=64)
    out = decoder.feed(b"~" * 50)
    out += decoder.feed(b"~" * 50)
    assert decoder.buffered <= 64
    out += decoder.feed(b"~~~\r\nOK\r\n")
    assert out == [AtResponse((), OK)]
    assert decoder.stats.oversize == 1


def test_an_oversize_line_arriving_at_once_is_dropped_too() -> None:
    decoder = AtDecoder(max_line=64)
    assert decoder.feed(b"~" * 100 + b"\r\n12345\r\nOK\r\n") == [AtResponse(("12345",), OK)]
    assert decoder.stats.oversize == 1
    assert decoder.take_errors() == 1


def test_flush_drops_half_lines_and_collected_lines() -> None:
    decoder = AtDecoder()
    decoder.feed(b"line one\r\nhalf a li")
    assert decoder.flush() > 0
    assert decoder.feed(b"\r\nOK\r\n") == [AtResponse((), OK)]


def test_encode_refuses_too_long_and_non_ascii_lines() -> None:
    assert encode_command("AT+CGSN") == b"AT+CGSN\r\n"
    with pytest.raises(ValueError, match="exceeds the 4096-byte line limit"):
        encode_command("AT%CMNG=0,1,0," + quote("A" * AT_HOST_MAX_LINE_BYTES))
    with pytest.raises(ValueError, match="not ASCII"):
        encode_command("AT+CGSN\u00e9")
    with pytest.raises(ValueError, match="double quote"):
        quote('a"b')


def test_command_decoder_keeps_line_breaks_inside_quotes() -> None:
    decoder = AtCommandDecoder()
    data = f'AT%CMNG=0,1,0,"{PEM}"\r\nAT+CGSN\r'.encode()
    assert decoder.feed(data) == [f'AT%CMNG=0,1,0,"{PEM}"', "AT+CGSN"]


def test_command_decoder_reports_a_line_too_long_for_the_modem() -> None:
    decoder = AtCommandDecoder(max_line=32)
    assert decoder.feed(b"AT" + b"x" * 40 + b"\r\nAT\r\n") == [OVERFLOW, "AT"]
    limit = AtCommandDecoder(max_line=32)
    assert limit.feed(b"A" * 30 + b"\r\n") == ["A" * 30]


# Lines a modem sends, and what the decoder must make of them.
_urcs = st.sampled_from(
    ['+CEREG: 2,"76C1","0102DA04",7', "%XSIM: 1", "+CSCON: 0", "%MDMEV: PRACH CE-LEVEL 0"]
)
_text = st.text(st.sampled_from("ABCDEFabcdef0123456789+/=_-: ,"), min_size=1, max_size=60).filter(
    lambda t: t.strip() != "" and parse_result(t.strip()) is None and t.strip()[:2].upper() != "AT"
)
_finals = st.sampled_from([OK, AtResult(ResultCode.ERROR), AtResult(ResultCode.CME_ERROR, 518)])
_garbage = st.binary(min_size=1, max_size=20).map(lambda b: bytes(0x80 | x for x in b) + b"\r\n")


@st.composite
def _stream(draw: st.DrawFn) -> tuple[bytes, list[object], list[str]]:
    data = b""
    responses: list[object] = []
    urcs: list[str] = []
    for _ in range(draw(st.integers(1, 5))):
        lines = [line.strip() for line in draw(st.lists(_text, max_size=4))]
        if draw(st.booleans()):
            lines.append(f'%CMNG: 1,0,"{PEM}"')
        for line in lines:
            if draw(st.booleans()):
                urc = draw(_urcs)
                urcs.append(urc)
                data += urc.encode() + b"\r\n"
            if draw(st.booleans()):
                data += draw(_garbage)
            data += line.encode() + b"\r\n"
        final = draw(_finals)
        data += final.encode()
        responses.append(AtResponse(tuple(lines), final))
    return data, responses, urcs


@settings(max_examples=150, deadline=None)
@given(_stream(), st.integers(1, 7))
def test_any_chunking_of_lines_urcs_and_garbage_decodes_the_same(
    stream: tuple[bytes, list[object], list[str]], chunk: int
) -> None:
    data, responses, urcs = stream
    decoder = AtDecoder()
    frames: list[object] = []
    for i in range(0, len(data), chunk):
        frames += decoder.feed(data[i : i + chunk])
    assert [f for f in frames if isinstance(f, AtResponse)] == responses
    assert [f.line for f in frames if isinstance(f, AtUrc)] == urcs
    assert feed_bytewise(AtDecoder(), data) == frames
    assert decoder.buffered == 0
