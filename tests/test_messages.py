"""Message payload codecs: round trips, exact consumption, safe unknown values."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from factoryd.errors import ProtocolViolationError
from factoryd.protocol.messages import (
    REQUEST_TYPES,
    BoardInfo,
    Command,
    FwBegin,
    FwChunk,
    FwEnd,
    GenKey,
    GetCsr,
    Hello,
    Lock,
    ObjectId,
    Read,
    Reboot,
    Sign,
    Status,
    Write,
)

REQUESTS = [
    Hello(),
    GenKey(0),
    GetCsr(0, "0b4f9c1e-5a7d-4d0e-9a53-2f1c0e6b7d88"),
    Write(ObjectId.DEVICE_CERT, b"\x30\x82" + b"c" * 500),
    Read(ObjectId.CA_CHAIN),
    Sign(0, b"n" * 32),
    Lock(),
    Reboot(),
    FwBegin(1000, "2.0.0"),
    FwChunk(2048, b"f" * 100),
    FwEnd(b"s" * 64),
]


@pytest.mark.parametrize("request_msg", REQUESTS, ids=lambda r: type(r).__name__)
def test_request_roundtrip_and_trailing_bytes(request_msg: object) -> None:
    cls = REQUEST_TYPES[request_msg.command]  # type: ignore[attr-defined]
    payload = request_msg.encode()  # type: ignore[attr-defined]
    assert cls.decode(payload) == request_msg
    with pytest.raises(ProtocolViolationError, match="trailing"):
        cls.decode(payload + b"\x00")


def test_every_command_has_a_request_type() -> None:
    assert set(REQUEST_TYPES) == set(Command) - {Command.BOOT}


def test_unknown_status_maps_to_internal() -> None:
    assert Status(200) is Status.INTERNAL


@given(
    model=st.text(max_size=40),
    serial=st.binary(min_size=1, max_size=16),
    locked=st.booleans(),
    objects=st.frozensets(st.sampled_from(ObjectId)),
    slots=st.frozensets(st.integers(0, 7)),
)
def test_board_info_roundtrip(
    model: str, serial: bytes, locked: bool, objects: frozenset[ObjectId], slots: frozenset[int]
) -> None:
    info = BoardInfo(1, model[:60], "1.0", b"h" * 32, serial, locked, objects, slots)
    assert BoardInfo.decode(info.encode()) == info


@given(data=st.binary(max_size=200))
def test_parsers_raise_only_protocol_violations(data: bytes) -> None:
    for cls in [*REQUEST_TYPES.values(), BoardInfo]:
        with contextlib.suppress(ProtocolViolationError):
            cls.decode(data)  # type: ignore[attr-defined]


def test_truncated_reply_names_the_field() -> None:
    info = BoardInfo(1, "m", "1.0", b"h" * 32, b"\x01\x23", False, frozenset(), frozenset())
    with pytest.raises(ProtocolViolationError, match="fw_sha256"):
        BoardInfo.decode(info.encode()[:10])
