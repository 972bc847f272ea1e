"""The request engine every board client sits on: waiters, loop-timer resends, flood cap, link loss.

One ``RequestEngine`` per open link is the link's ``LinkListener``. A client encodes a request
(the encoding is the client's), hands the bytes to ``call`` and gets the reply frame back. What
differs between protocols is a small ``ReplyPolicy``: how a frame is routed (the reply to which
key, a NACK, an event), whether a reply names another command than its request, what a NACK after
the last resend means, and which commands are asked again when the board stays silent; and, for
protocols without sequence numbers, the *exclusive* mode. Everything else is written once here:

- the waiter is registered before the frame is sent and removed in ``finally``;
- a silent board is resent to when a loop timer (``call_later``) fires: no task per request;
- a NACK or a garbled frame resends at once (the same bytes, not encoded again);
- more than ``MAX_FRAME_ERRORS`` undecodable frames on one link fail everything with
  ``BoardFloodError`` and refuse further requests;
- when the link is lost or closed every waiter fails with a typed ``LinkClosedError``.

Correlation styles:

- **keyed** (native ``factoryd-v1``): many requests in flight, each keyed by its seq
  (``next_key``); the client's own event handling (BOOT) uses ``waiters``/``resend``/``fail``.
  ``call_many`` sends several in one write, to a board that queues them (native revision 3).
- **exclusive** (``arduino-v1``, no seq numbers): one request at a time under a lock, key
  ``EXCLUSIVE_KEY``. After a timeout or a cancelled request a late reply may still arrive, so the
  next request first listens to the line for ``late_reply_s`` and drops what comes
  (``late_replies_dropped``); a request that saw only garbled frames fails with
  ``ProtocolViolationError`` instead of a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import structlog

from factoryd.errors import (
    BoardFloodError,
    BoardTimeoutError,
    LinkClosedError,
    ProtocolViolationError,
)
from factoryd.transport.serial_link import SerialLink

log = structlog.get_logger(__name__)

# Undecodable frames one link may deliver before the board is declared broken: line noise
# costs a handful, a board that sprays garbage costs hundreds.
MAX_FRAME_ERRORS = 64
# The one key of an exclusive engine (one request at a time, no sequence numbers).
EXCLUSIVE_KEY = 0
# Sequence numbers are u16 and 0 is never used (docs/protocol.md).
MAX_SEQ = 0xFFFF

F = TypeVar("F")
C = TypeVar("C", bound=IntEnum)
F_contra = TypeVar("F_contra", contravariant=True)
C_contra = TypeVar("C_contra", bound=IntEnum, contravariant=True)


class Route(Enum):
    """Where an arriving frame goes."""

    REPLY = "reply"  # to the waiter under ``ReplyPolicy.reply_key(frame)``
    NACK = "nack"  # the board could not decode our frame: resend what is pending
    EVENT = "event"  # unsolicited; handed to ``ReplyPolicy.event``
    UNMATCHED = "unmatched"  # counted and dropped


class ReplyPolicy(Protocol[F_contra, C_contra]):
    """The per-protocol part of the engine: how frames are matched and what a NACK means."""

    def route(self, frame: F_contra) -> Route:
        """Classify an arriving frame."""
        ...

    def reply_key(self, frame: F_contra) -> int:
        """The waiter key a REPLY frame answers (``EXCLUSIVE_KEY`` in exclusive mode)."""
        ...

    def mismatch(self, command: C_contra, frame: F_contra) -> str | None:
        """Why a reply does not answer a ``command`` request (None when it does)."""
        ...

    def nack_exhausted(self, attempts: int) -> str | None:
        """Why a request NACKed after its last resend fails now (None: wait for its timer)."""
        ...

    def resend_on_timeout(self, command: C_contra) -> bool:
        """Whether a silent board is asked again (False where a late first reply would mislead)."""
        ...

    def event(self, frame: F_contra) -> None:
        """An unsolicited frame (a BOOT event, say)."""
        ...


@dataclass
class RequestStats:
    """Counters of one client's engine, exported as link statistics."""

    requests: int = 0
    replies: int = 0
    resends: int = 0
    nacks: int = 0
    frame_errors: int = 0
    unmatched: int = 0
    timeouts: int = 0
    # Native: BOOT events seen; exclusive: frames dropped in the late-reply window.
    boots: int = 0
    late_replies_dropped: int = 0


class Waiter(Generic[F, C]):
    """One request waiting for its reply."""

    __slots__ = (
        "command",
        "data",
        "future",
        "garbled",
        "resend_on_timeout",
        "resends_left",
        "timeout_s",
        "timer",
    )

    def __init__(
        self,
        command: C,
        data: bytes,
        future: asyncio.Future[F],
        resends_left: int,
        timeout_s: float,
        *,
        resend_on_timeout: bool,
    ) -> None:
        self.command = command
        # The encoded frame: resends send the same bytes without encoding again.
        self.data = data
        self.future = future
        self.resends_left = resends_left
        self.timeout_s = timeout_s
        self.resend_on_timeout = resend_on_timeout
        self.timer: asyncio.TimerHandle | None = None
        # Garbled frames that arrived while this request waited (the replies, most likely).
        self.garbled = 0


class RequestEngine(Generic[F, C]):
    """Requests and replies over one link; the link's listener."""

    def __init__(
        self,
        link: SerialLink[Any],
        policy: ReplyPolicy[F, C],
        *,
        resends: int = 3,
        exclusive: bool = False,
        late_reply_s: float = 0.0,
    ) -> None:
        self.link = link
        self.policy = policy
        self.resends = resends
        self.stats = RequestStats()
        self.exclusive = exclusive
        self.late_reply_s = late_reply_s
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[int, Waiter[F, C]] = {}
        self._seq = 0
        self._lost: BaseException | None = None
        self._lock = asyncio.Lock() if exclusive else None
        self._late_reply_possible = False
        # call(key, command, data, timeout_s) -> reply frame: send an encoded request, resent on
        # NACK, garble and timeout. Bound once: a keyed request costs no extra coroutine hop.
        self.call: Callable[[int, C, bytes, float], Awaitable[F]] = (
            self._call_exclusive if exclusive else self._exchange
        )
        link.attach(self)

    @property
    def pending(self) -> int:
        """Requests waiting for a reply (0 when idle; tests check nothing is left behind)."""
        return len(self._waiters)

    def waiters(self) -> Iterator[Waiter[F, C]]:
        """The requests still waiting (a copy: the caller may resend or fail them)."""
        return iter([w for w in self._waiters.values() if not w.future.done()])

    def next_key(self) -> int:
        """A free sequence number for a keyed request (1..65535, never one in flight)."""
        while True:
            self._seq = self._seq % MAX_SEQ + 1
            if self._seq not in self._waiters:
                return self._seq

    async def close(self) -> None:
        """Close the link; pending requests fail with LinkClosedError."""
        await self.link.close()
        self._fail_all(LinkClosedError(f"link {self.link.path} closed by the host"))

    def check_open(self) -> None:
        """Raise the typed error of a lost or flooded link."""
        if isinstance(self._lost, BoardFloodError):
            raise self._lost
        if self._lost is not None:
            raise LinkClosedError(f"link {self.link.path} is closed") from self._lost

    async def _call_exclusive(self, key: int, command: C, data: bytes, timeout_s: float) -> F:
        if self._lock is None:
            raise RuntimeError("_call_exclusive on a keyed engine")
        async with self._lock:
            self.check_open()
            if self._late_reply_possible:
                await self._drop_late_replies()
            return await self._exchange(key, command, data, timeout_s)

    async def _exchange(self, key: int, command: C, data: bytes, timeout_s: float) -> F:
        self.check_open()
        waiter = self._register(key, command, data, timeout_s)
        try:
            self.link.send(data)
            waiter.timer = self._loop.call_later(timeout_s, self._timed_out, waiter)
            return await waiter.future
        finally:
            self._release(key, waiter)

    def _register(self, key: int, command: C, data: bytes, timeout_s: float) -> Waiter[F, C]:
        """A waiter for ``key``, registered before its frame is sent."""
        waiter = Waiter(
            command,
            data,
            self._loop.create_future(),
            self.resends,
            timeout_s,
            resend_on_timeout=self.policy.resend_on_timeout(command),
        )
        self._waiters[key] = waiter
        self.stats.requests += 1
        return waiter

    def _release(self, key: int, waiter: Waiter[F, C]) -> None:
        """Remove a waiter whatever ended it: timer cancelled, an unsettled future cancelled."""
        del self._waiters[key]
        if waiter.timer is not None:
            waiter.timer.cancel()
        future = waiter.future
        if not future.done():
            if self.exclusive:
                # Cancelled from outside: its reply may still come and must not answer the next one.
                self._late_reply_possible = True
            future.cancel()
        elif not future.cancelled():
            future.exception()  # retrieved: a burst's second failure is not reported as unhandled

    async def call_many(self, calls: Sequence[tuple[int, C, bytes, float]]) -> list[F]:
        """Pipelined keyed requests (key, command, encoded, timeout_s): sent in one write, replies in order.

        Only for a board that queues requests and answers them in order (native revision 3). Each
        request's timer covers the ones before it (the board works through them one by one); resends,
        NACKs and garbled replies are handled per request as for ``call``. The first request (in order)
        that fails raises at once and the rest are given up (their late replies are dropped unmatched):
        the caller retries the burst or restarts the job, which every request in a burst must allow.
        """
        if self.exclusive:
            raise RuntimeError("call_many on an exclusive engine (one request at a time)")
        self.check_open()
        waiters: list[tuple[int, Waiter[F, C]]] = []
        budget_s = 0.0
        for key, command, data, timeout_s in calls:
            budget_s += timeout_s
            waiters.append((key, self._register(key, command, data, budget_s)))
        try:
            self.link.send(b"".join(waiter.data for _, waiter in waiters), frames=len(waiters))
            for _, waiter in waiters:
                waiter.timer = self._loop.call_later(waiter.timeout_s, self._timed_out, waiter)
            return [await waiter.future for _, waiter in waiters]
        finally:
            for key, waiter in waiters:
                self._release(key, waiter)

    async def _drop_late_replies(self) -> None:
        before = self.stats.unmatched
        await asyncio.sleep(self.late_reply_s)
        self.stats.late_replies_dropped += self.stats.unmatched - before
        self.link.decoder.flush()
        self._late_reply_possible = False
        self.check_open()

    def _timed_out(self, waiter: Waiter[F, C]) -> None:
        if waiter.future.done():
            return
        if self.exclusive:
            # A reply may still be on its way; and a half-received frame will never complete.
            self._late_reply_possible = True
            self.link.decoder.flush()
        if waiter.resend_on_timeout and waiter.resends_left > 0:
            self.resend(waiter)
            return
        tries = 1 + self.resends - waiter.resends_left
        name = waiter.command.name
        if self.exclusive and waiter.garbled:
            waiter.future.set_exception(
                ProtocolViolationError(
                    f"{name} to {self.link.path}: {waiter.garbled} garbled replies and "
                    f"no valid one after {tries} attempts"
                )
            )
            return
        self.stats.timeouts += 1
        waiter.future.set_exception(
            BoardTimeoutError(
                f"{name} to {self.link.path}: no reply after {tries} "
                f"attempt{'s' if tries > 1 else ''} ({waiter.timeout_s:.2f} s each)"
            )
        )

    def resend(self, waiter: Waiter[F, C]) -> None:
        """Send a pending request again (the same bytes) and restart its timer."""
        waiter.resends_left -= 1
        self.stats.resends += 1
        log.debug("resend", command=waiter.command.name, path=self.link.path)
        try:
            self.link.send(waiter.data)
        except LinkClosedError as exc:
            waiter.future.set_exception(exc)
            return
        if waiter.timer is not None:
            waiter.timer.cancel()
        waiter.timer = self._loop.call_later(waiter.timeout_s, self._timed_out, waiter)

    def fail(self, waiter: Waiter[F, C], exc: BaseException) -> None:
        """Fail one pending request."""
        if not waiter.future.done():
            waiter.future.set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(exc)

    # LinkListener -----------------------------------------------------------------------

    def frame_received(self, frame: F) -> None:
        """Route a frame from the link to its waiter."""
        route = self.policy.route(frame)
        if route is Route.REPLY:
            waiter = self._waiters.get(self.policy.reply_key(frame))
            if waiter is None or waiter.future.done():
                self.stats.unmatched += 1
                return
            problem = self.policy.mismatch(waiter.command, frame)
            if problem is not None:
                waiter.future.set_exception(ProtocolViolationError(problem))
                return
            self.stats.replies += 1
            waiter.future.set_result(frame)
        elif route is Route.NACK:
            if self.exclusive and not any(True for _ in self.waiters()):
                self.stats.unmatched += 1  # no request of ours is out: not a NACK of anything
                return
            self.stats.nacks += 1
            for waiter in self.waiters():
                if waiter.resends_left > 0:
                    self.resend(waiter)
                else:
                    problem = self.policy.nack_exhausted(self.resends + 1)
                    if problem is not None:
                        waiter.future.set_exception(
                            ProtocolViolationError(f"{waiter.command.name} to {self.link.path}: {problem}")
                        )
        elif route is Route.EVENT:
            self.policy.event(frame)
        else:
            self.stats.unmatched += 1

    def frame_errors(self, count: int) -> None:
        """A garbled frame arrived: most likely a reply, so ask again at once."""
        self.stats.frame_errors += count
        if self.stats.frame_errors > MAX_FRAME_ERRORS:
            if self._lost is None:
                error = BoardFloodError(
                    f"board on {self.link.path} sent {self.stats.frame_errors} undecodable frames; "
                    "refusing to talk to it"
                )
                self._lost = error
                self._fail_all(error)
            return
        for waiter in self.waiters():
            waiter.garbled += count
            if waiter.resends_left > 0:
                self.resend(waiter)

    def link_lost(self, exc: BaseException | None) -> None:
        """Fail every waiter: the tty is gone."""
        if self._lost is None:
            self._lost = exc or LinkClosedError("link closed")
        error = LinkClosedError(f"serial device {self.link.path} vanished")
        if exc is not None:
            error.__cause__ = exc
        self._fail_all(error)


class EngineClient(Generic[F, C]):
    """What every client on the engine shares: an async context manager, ``close``, ``pending``, ``stats``."""

    def __init__(self, engine: RequestEngine[F, C]) -> None:
        self._engine = engine
        self.stats: RequestStats = engine.stats

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the link; pending requests fail with LinkClosedError."""
        await self._engine.close()

    @property
    def pending(self) -> int:
        """Requests waiting for a reply (0 when idle; tests check nothing is left behind)."""
        return self._engine.pending
