"""The async ledger facade: it mirrors ``Ledger`` and runs every call on one private worker thread."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
import typing
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from factoryd.errors import ConfigError, LedgerError, LotNotFoundError
from factoryd.ledger import AsyncLedger, Ledger, LotProfile, LotState, Reservation
from factoryd.ledger.aio import _Opening

ACTOR = "test"
WORKER_PREFIX = "factoryd-ledger"
# Life-cycle members that mirror differently: a context manager becomes an async one, and
# ``backend`` is a property without I/O that callers read on ``AsyncLedger.sync``.
NOT_MIRRORED = {"backend"}


def _public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    """Public callables of ``cls`` (classmethods unwrapped to their function), properties excluded."""
    methods: dict[str, Callable[..., Any]] = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, property):
            continue
        if isinstance(raw, classmethod | staticmethod):
            methods[name] = raw.__func__
        elif callable(raw):
            methods[name] = raw
    return methods


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    return typing.get_type_hints(fn)


def test_every_ledger_method_has_an_async_twin_with_the_same_signature() -> None:
    sync_methods = _public_methods(Ledger)
    async_methods = _public_methods(AsyncLedger)
    assert set(sync_methods) - NOT_MIRRORED == set(async_methods), (
        "AsyncLedger must offer exactly Ledger's public methods"
    )
    for name in NOT_MIRRORED:
        assert isinstance(inspect.getattr_static(Ledger, name), property)
        assert not hasattr(AsyncLedger, name)
    for name, sync_fn in sync_methods.items():
        if name in NOT_MIRRORED:
            continue
        async_fn = async_methods[name]
        sync_sig, async_sig = inspect.signature(sync_fn), inspect.signature(async_fn)
        sync_params = [(p.name, p.kind, p.default) for p in sync_sig.parameters.values()]
        async_params = [(p.name, p.kind, p.default) for p in async_sig.parameters.values()]
        assert async_params == sync_params, f"{name}: parameters differ"
        sync_hints, async_hints = _hints(sync_fn), _hints(async_fn)
        sync_return, async_return = sync_hints.pop("return"), async_hints.pop("return")
        assert async_hints == sync_hints, f"{name}: parameter annotations differ"
        if name == "open":
            # Ledger.open returns a Ledger; AsyncLedger.open an awaitable AsyncLedger (and context manager).
            assert sync_return is Ledger
            assert async_return is _Opening
            assert typing.get_args(_hints(_Opening.__await__)["return"])[-1] is AsyncLedger
            assert _hints(_Opening.__aenter__)["return"] is AsyncLedger
            continue
        assert inspect.iscoroutinefunction(async_fn), f"AsyncLedger.{name} must be async"
        assert async_return == sync_return, f"{name}: return types differ"


def test_context_managers_mirror() -> None:
    assert inspect.iscoroutinefunction(AsyncLedger.__aenter__)
    assert inspect.iscoroutinefunction(AsyncLedger.__aexit__)
    assert _hints(AsyncLedger.__aexit__) == _hints(Ledger.__exit__)


class _Spy:
    """Stands in for a Ledger: records which method ran, with what, on which thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...], dict[str, object], str]] = []

    def __getattr__(self, name: str) -> Callable[..., object]:
        def method(*args: object, **kwargs: object) -> object:
            self.calls.append((name, args, kwargs, threading.current_thread().name))
            return ("result of", name)

        return method


def _arguments(fn: Callable[..., Any]) -> tuple[list[object], dict[str, object]]:
    """A distinct sentinel for every parameter of ``fn`` (bar ``self``), positional or keyword as declared."""
    args: list[object] = []
    kwargs: dict[str, object] = {}
    for param in list(inspect.signature(fn).parameters.values())[1:]:
        value = f"<{param.name}>"
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[param.name] = value
        else:
            args.append(value)
    return args, kwargs


async def test_every_async_method_delegates_its_arguments_on_the_worker_thread() -> None:
    spy = _Spy()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_PREFIX)
    aledger = AsyncLedger(cast(Ledger, spy), executor)
    names = sorted(set(_public_methods(AsyncLedger)) - {"open", "close"})
    try:
        for name in names:
            args, kwargs = _arguments(getattr(Ledger, name))
            result = await getattr(aledger, name)(*args, **kwargs)
            called, got_args, got_kwargs, thread = spy.calls[-1]
            sync_sig = inspect.signature(getattr(Ledger, name))
            assert called == name
            # The same binding to the sync method's parameters, whichever way they were passed on.
            expected = sync_sig.bind(spy, *args, **kwargs).arguments
            assert sync_sig.bind(spy, *got_args, **got_kwargs).arguments == expected, name
            assert thread.startswith(WORKER_PREFIX), f"{name} ran on {thread}"
            if _hints(getattr(Ledger, name))["return"] is not type(None):
                assert result == ("result of", name)
    finally:
        await aledger.close()
    assert spy.calls[-1][0] == "close"
    assert spy.calls[-1][3].startswith(WORKER_PREFIX)


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A fresh SQLite ledger file."""
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def _new_ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


async def _active_lot(aledger: AsyncLedger, ids: list[str], name: str = "aio") -> str:
    await aledger.create_lot(name, customer="ACME", profile=LotProfile(), target_quantity=None, actor=ACTOR)
    assert await aledger.import_ids(name, "\n".join(ids).encode(), actor=ACTOR) == len(ids)
    await aledger.set_lot_state(name, LotState.ACTIVE, actor=ACTOR)
    return name


async def test_calls_run_on_one_worker_thread_while_the_loop_keeps_running(url: str) -> None:
    ids = _new_ids(2)
    async with AsyncLedger.open(url) as aledger:
        lot = await _active_lot(aledger, ids)
        loop_thread = threading.get_ident()
        worker_threads: set[int] = set()

        async def tick() -> int:
            # The loop keeps running while the worker thread does the I/O.
            await asyncio.sleep(0)
            return threading.get_ident()

        results = await asyncio.gather(
            aledger.reserve(lot, "se-1", station="s", port="1", job_id=None, actor=ACTOR),
            aledger.reserve(lot, "se-1", station="s", port="1", job_id=None, actor=ACTOR),
            tick(),
        )
        first, second, tick_thread = results
        assert isinstance(first, Reservation)
        assert isinstance(second, Reservation)
        assert tick_thread == loop_thread
        assert first.device_id == second.device_id == ids[0]
        assert [first.resumed, second.resumed] == [False, True]
        worker_threads.add(await aledger._run(threading.get_ident))
        worker_threads.add(await aledger._run(threading.get_ident))
        assert len(worker_threads) == 1
        assert loop_thread not in worker_threads
        assert (await aledger.progress(lot)).reserved == 1
        assert await aledger.verify_audit() == 5


async def test_the_loop_is_not_blocked_by_a_slow_call(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with AsyncLedger.open(url) as aledger:
        release = threading.Event()
        original = aledger.sync.list_lots

        def slow_list_lots() -> list[Any]:
            release.wait(timeout=10)
            return original()

        monkeypatch.setattr(aledger.sync, "list_lots", slow_list_lots)
        call = asyncio.create_task(aledger.list_lots())
        # Had the call run on the loop, these sleeps would only end after it did.
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert not call.done()
        release.set()
        assert await call == []


async def test_bound_context_reaches_the_worker(url: str) -> None:
    # structlog's contextvars (the job being logged) must follow a call onto the worker thread.
    job = contextvars.ContextVar[str]("job")
    async with AsyncLedger.open(url) as aledger:
        token = job.set("job-42")
        try:
            assert await aledger._run(job.get) == "job-42"
        finally:
            job.reset(token)
        assert await aledger._run(job.get, "none") == "none"


async def test_a_call_cancelled_while_it_runs_still_commits(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _new_ids(1)
    async with AsyncLedger.open(url) as aledger:
        lot = await _active_lot(aledger, ids)
        started, release = threading.Event(), threading.Event()
        original = aledger.sync.reserve

        def held_reserve(*args: Any, **kwargs: Any) -> Reservation:
            started.set()
            release.wait(timeout=10)
            return original(*args, **kwargs)

        monkeypatch.setattr(aledger.sync, "reserve", held_reserve)
        call = asyncio.create_task(
            aledger.reserve(lot, "se-1", station="s", port="1", job_id=None, actor=ACTOR)
        )
        assert await asyncio.to_thread(started.wait, 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        # One FIFO worker: this lookup runs after the cancelled reservation finished and committed.
        record = await aledger.find_by_serial(lot, "se-1")
        assert record is not None
        assert record.device_id == ids[0]


def _workers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX)}


def _wait_gone(threads: set[threading.Thread]) -> bool:
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not any(t.is_alive() for t in threads)


async def test_close_stops_the_worker_and_refuses_later_calls(url: str) -> None:
    before = _workers()
    aledger = await AsyncLedger.open(url)
    assert await aledger.list_lots() == []
    with pytest.raises(LotNotFoundError):
        await aledger.get_lot("none")
    mine = _workers() - before
    assert len(mine) == 1
    await aledger.close()
    await aledger.close()  # closing twice is harmless
    assert not any(t.is_alive() for t in mine)
    with pytest.raises(LedgerError, match="closed"):
        await aledger.list_lots()
    with pytest.raises(LedgerError, match="closed"):
        aledger.sync.list_lots()


async def test_async_with_closes_even_when_the_block_fails(url: str) -> None:
    before = _workers()
    opened: list[AsyncLedger] = []

    async def use_then_fail() -> None:
        async with AsyncLedger.open(url) as aledger:
            opened.append(aledger)
            await aledger.list_lots()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await use_then_fail()
    with pytest.raises(LedgerError, match="closed"):
        await opened[0].list_lots()
    assert not any(t.is_alive() for t in _workers() - before)


async def test_a_failed_open_leaves_no_worker_behind() -> None:
    before = _workers()
    with pytest.raises(ConfigError, match="unsupported ledger database"):
        await AsyncLedger.open("mysql://nobody@127.0.0.1/none")
    assert await asyncio.to_thread(_wait_gone, _workers() - before)
