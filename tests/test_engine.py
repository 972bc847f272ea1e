"""The request engine alone, over a fake link: waiters, resends, NACKs, flood, link loss, exclusive mode."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import pytest

from factoryd.errors import BoardFloodError, BoardTimeoutError, LinkClosedError, ProtocolViolationError
from factoryd.protocol.engine import EXCLUSIVE_KEY, MAX_FRAME_ERRORS, RequestEngine, Route

TIMEOUT_S = 0.05


class Cmd(IntEnum):
    PING = 1
    SLOW = 2


@dataclass(frozen=True)
class FakeFrame:
    route: Route
    key: int = 0
    command: int = Cmd.PING


@dataclass
class FakeDecoder:
    flushed: int = 0

    def feed(self, data: bytes) -> list[Any]:
        return []

    def take_errors(self) -> int:
        return 0

    def flush(self) -> int:
        self.flushed += 1
        return 0


@dataclass
class FakeLink:
    """What the engine uses of a SerialLink: send, attach, close, path, decoder."""

    path: str = "/dev/fake"
    decoder: FakeDecoder = field(default_factory=FakeDecoder)
    sent: list[bytes] = field(default_factory=list)
    open: bool = True
    listener: Any = None

    def attach(self, listener: Any) -> None:
        self.listener = listener

    def send(self, data: bytes) -> None:
        if not self.open:
            raise LinkClosedError(f"serial link {self.path} is closed")
        self.sent.append(data)

    async def close(self) -> None:
        self.open = False


@dataclass
class Policy:
    nack_error: str | None = None
    events: list[FakeFrame] = field(default_factory=list)
    # Commands not resent when their timer fires.
    once: frozenset[Cmd] = frozenset({Cmd.SLOW})

    def route(self, frame: FakeFrame) -> Route:
        return frame.route

    def reply_key(self, frame: FakeFrame) -> int:
        return frame.key

    def mismatch(self, command: Cmd, frame: FakeFrame) -> str | None:
        return None if frame.command == command else f"reply for {frame.command} to {command.name}"

    def nack_exhausted(self, attempts: int) -> str | None:
        return None if self.nack_error is None else f"{self.nack_error} after {attempts}"

    def resend_on_timeout(self, command: Cmd) -> bool:
        return command not in self.once

    def event(self, frame: FakeFrame) -> None:
        self.events.append(frame)


def engine(
    *, exclusive: bool = False, resends: int = 2, policy: Policy | None = None, late_reply_s: float = 0.02
) -> tuple[RequestEngine[FakeFrame, Cmd], FakeLink]:
    link = FakeLink()
    eng: RequestEngine[FakeFrame, Cmd] = RequestEngine(
        link,  # type: ignore[arg-type]  # a fake with the SerialLink surface the engine uses
        policy or Policy(),
        resends=resends,
        exclusive=exclusive,
        late_reply_s=late_reply_s,
    )
    assert link.listener is eng
    return eng, link


async def reply_soon(eng: RequestEngine[FakeFrame, Cmd], frame: FakeFrame, delay_s: float = 0.0) -> None:
    await asyncio.sleep(delay_s)
    eng.frame_received(frame)


async def test_reply_resolves_and_the_waiter_is_removed() -> None:
    eng, link = engine()
    key = eng.next_key()
    call = asyncio.ensure_future(eng.call(key, Cmd.PING, b"req", TIMEOUT_S))
    await asyncio.sleep(0)
    assert eng.pending == 1
    assert link.sent == [b"req"]
    eng.frame_received(FakeFrame(Route.REPLY, key))
    assert (await call).key == key
    assert eng.pending == 0
    assert (eng.stats.requests, eng.stats.replies, eng.stats.resends) == (1, 1, 0)


async def test_silent_board_is_resent_to_on_the_timer_then_times_out_and_nothing_is_left() -> None:
    eng, link = engine(resends=2)
    with pytest.raises(BoardTimeoutError, match=r"PING to /dev/fake: no reply after 3 attempts"):
        await eng.call(eng.next_key(), Cmd.PING, b"req", TIMEOUT_S)
    assert link.sent == [b"req"] * 3  # the same bytes, not encoded again
    assert eng.pending == 0
    assert (eng.stats.resends, eng.stats.timeouts) == (2, 1)


async def test_cancelled_request_removes_its_waiter() -> None:
    eng, _ = engine()
    call = asyncio.ensure_future(eng.call(eng.next_key(), Cmd.PING, b"req", 10.0))
    await asyncio.sleep(0)
    assert eng.pending == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert eng.pending == 0


async def test_nack_resends_every_pending_request_at_once() -> None:
    eng, link = engine()
    first, second = eng.next_key(), eng.next_key()
    calls = [
        asyncio.ensure_future(eng.call(first, Cmd.PING, b"a", 10.0)),
        asyncio.ensure_future(eng.call(second, Cmd.PING, b"b", 10.0)),
    ]
    await asyncio.sleep(0)
    eng.frame_received(FakeFrame(Route.NACK))
    assert link.sent == [b"a", b"b", b"a", b"b"]
    assert eng.stats.nacks == 1
    for key in (first, second):
        eng.frame_received(FakeFrame(Route.REPLY, key))
    await asyncio.gather(*calls)
    assert eng.pending == 0


async def test_nack_with_no_resends_left_fails_when_the_policy_says_so() -> None:
    eng, _ = engine(resends=0, policy=Policy(nack_error="NACKed"))
    call = asyncio.ensure_future(eng.call(eng.next_key(), Cmd.PING, b"a", 10.0))
    await asyncio.sleep(0)
    eng.frame_received(FakeFrame(Route.NACK))
    with pytest.raises(ProtocolViolationError, match="PING to /dev/fake: NACKed after 1"):
        await call


async def test_garbled_frame_resends_and_a_wrong_command_is_a_violation() -> None:
    eng, link = engine()
    key = eng.next_key()
    call = asyncio.ensure_future(eng.call(key, Cmd.PING, b"a", 10.0))
    await asyncio.sleep(0)
    eng.frame_errors(1)
    assert link.sent == [b"a", b"a"]
    eng.frame_received(FakeFrame(Route.REPLY, key, command=Cmd.SLOW))
    with pytest.raises(ProtocolViolationError, match="reply for 2 to PING"):
        await call
    assert eng.stats.frame_errors == 1


async def test_flood_fails_everything_and_refuses_further_requests() -> None:
    eng, _ = engine()
    call = asyncio.ensure_future(eng.call(eng.next_key(), Cmd.PING, b"a", 10.0))
    await asyncio.sleep(0)
    eng.frame_errors(MAX_FRAME_ERRORS + 1)
    with pytest.raises(BoardFloodError, match="undecodable frames"):
        await call
    with pytest.raises(BoardFloodError):
        await eng.call(eng.next_key(), Cmd.PING, b"b", 10.0)
    assert eng.pending == 0


async def test_link_lost_fails_every_waiter_with_a_typed_error() -> None:
    eng, _ = engine()
    calls = [asyncio.ensure_future(eng.call(eng.next_key(), Cmd.PING, b"a", 10.0)) for _ in range(3)]
    await asyncio.sleep(0)
    cause = OSError("gone")
    eng.link_lost(cause)
    for call in calls:
        with pytest.raises(LinkClosedError, match="vanished") as info:
            await call
        assert info.value.__cause__ is cause
    with pytest.raises(LinkClosedError, match="is closed"):
        await eng.call(eng.next_key(), Cmd.PING, b"b", 10.0)
    assert eng.pending == 0


async def test_close_fails_pending_requests() -> None:
    eng, _ = engine()
    call = asyncio.ensure_future(eng.call(eng.next_key(), Cmd.PING, b"a", 10.0))
    await asyncio.sleep(0)
    await eng.close()
    with pytest.raises(LinkClosedError, match="closed by the host"):
        await call


async def test_events_and_unmatched_frames() -> None:
    policy = Policy()
    eng, _ = engine(policy=policy)
    eng.frame_received(FakeFrame(Route.EVENT))
    eng.frame_received(FakeFrame(Route.REPLY, 99))
    eng.frame_received(FakeFrame(Route.UNMATCHED))
    assert policy.events == [FakeFrame(Route.EVENT)]
    assert eng.stats.unmatched == 2


async def test_keys_skip_those_in_flight() -> None:
    eng, _ = engine()
    first = eng.next_key()
    call = asyncio.ensure_future(eng.call(first, Cmd.PING, b"a", 10.0))
    await asyncio.sleep(0)
    keys = {eng.next_key() for _ in range(0xFFFF - 1)}
    assert first not in keys
    assert 0 not in keys
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_exclusive_mode_runs_one_request_at_a_time() -> None:
    eng, link = engine(exclusive=True)
    first = asyncio.ensure_future(eng.call(EXCLUSIVE_KEY, Cmd.PING, b"a", 10.0))
    second = asyncio.ensure_future(eng.call(EXCLUSIVE_KEY, Cmd.PING, b"b", 10.0))
    await asyncio.sleep(0)
    assert link.sent == [b"a"]  # b waits for the lock
    eng.frame_received(FakeFrame(Route.REPLY))
    await first
    await asyncio.sleep(0)
    assert link.sent == [b"a", b"b"]
    eng.frame_received(FakeFrame(Route.REPLY))
    await second
    assert eng.pending == 0


async def test_exclusive_mode_drops_a_late_reply_after_a_timeout() -> None:
    eng, link = engine(exclusive=True, resends=0, late_reply_s=0.05)
    with pytest.raises(BoardTimeoutError, match="no reply after 1 attempt "):
        await eng.call(EXCLUSIVE_KEY, Cmd.SLOW, b"slow", TIMEOUT_S)
    assert link.decoder.flushed == 1  # the half-received frame is dropped on the timeout
    nxt = asyncio.ensure_future(eng.call(EXCLUSIVE_KEY, Cmd.PING, b"ping", 10.0))
    await asyncio.sleep(0.01)
    # The late reply to SLOW arrives inside the window: dropped, not taken for PING's.
    eng.frame_received(FakeFrame(Route.REPLY, command=Cmd.SLOW))
    assert link.sent == [b"slow"]
    await asyncio.sleep(0.08)
    assert link.sent == [b"slow", b"ping"]
    eng.frame_received(FakeFrame(Route.REPLY, command=Cmd.PING))
    assert (await nxt).command == Cmd.PING
    assert eng.stats.late_replies_dropped == 1


async def test_exclusive_mode_without_resend_on_timeout_sends_once() -> None:
    eng, link = engine(exclusive=True, resends=3)
    with pytest.raises(BoardTimeoutError):
        await eng.call(EXCLUSIVE_KEY, Cmd.SLOW, b"slow", TIMEOUT_S)
    assert link.sent == [b"slow"]


async def test_exclusive_mode_garbled_replies_are_a_violation_not_a_timeout() -> None:
    eng, _ = engine(exclusive=True, resends=1)
    call = asyncio.ensure_future(eng.call(EXCLUSIVE_KEY, Cmd.PING, b"a", TIMEOUT_S))
    await asyncio.sleep(0)
    eng.frame_errors(1)
    eng.frame_errors(1)
    with pytest.raises(ProtocolViolationError, match="2 garbled replies"):
        await call
