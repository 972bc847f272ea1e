"""The station page without a browser: sessions, CSRF, roles, the event stream and the slot views."""

from __future__ import annotations

import asyncio
import json
import re
import stat
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlmodel import Session, col, select

from factoryd.api.page import feed as feed_module
from factoryd.api.page.feed import LotUnavailable, LotView, SlotView, StationFeed, view_json
from factoryd.api.page.labels import (
    STEP_DETOURS,
    STEP_TEXT,
    UNKNOWN_STEP_TEXT,
    grid_shape,
    slot_order,
    step_progress,
    step_text,
)
from factoryd.api.page.sessions import CSRF_HEADER, PAGE_KEY_FILE, SESSION_COOKIE, load_page_key
from factoryd.config import PageConfig, load_settings
from factoryd.errors import ConfigError, FactorydError
from factoryd.jobs.profiles import PROFILES, profile_names
from factoryd.jobs.scheduler import PortControl, Station
from factoryd.jobs.steps import Step
from factoryd.ledger import LotProfile, LotState
from factoryd.ledger.engine import create_ledger_engine
from factoryd.ledger.model import LotInfo, LotProgress
from factoryd.ledger.tables import AuditEntryRow
from factoryd.telemetry.events import JobEvent, JobEventKind, LotProgressUpdate, PortState, PortUpdate
from factoryd.telemetry.live import LiveSnapshot, LiveState
from factoryd.telemetry.reasons import REASON_TEXT, reason_text
from tests.helpers.api import Api, running_api

CODES = (
    "csr_rejected",
    "board_timeout",
    "readback_mismatch",
    "board_flood",
    "identity_mismatch",
    "refused_board",
    "hub_command",
)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """A live API (no station) with tokens admin, operator, supervisor, acme, globex."""
    async with running_api(tmp_path) as served:
        yield served


@asynccontextmanager
async def login(api: Api, who: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client holding a page session for token ``who``, and the page's CSRF token."""
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
        answer = await client.post("/station/login", data={"token": api.secrets[who]})
        assert answer.status_code == 303, answer.text
        page = await client.get("/station")
        found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
        assert found, page.text
        yield client, found.group(1)


def audit(api: Api) -> list[AuditEntryRow]:
    """Every audit entry, in order."""
    engine = create_ledger_engine(api.settings.ledger_url)
    try:
        with Session(engine) as session:
            return list(session.exec(select(AuditEntryRow).order_by(col(AuditEntryRow.seq))).all())
    finally:
        engine.dispose()


# Sessions -------------------------------------------------------------------------------------------


async def test_login_form_then_a_strict_httponly_session_cookie(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as anon:
        form = await anon.get("/station")
        assert form.status_code == 200
        assert '<form method="post" action="/station/login"' in form.text
        assert "default-src 'none'" in form.headers["content-security-policy"]
        answer = await anon.post("/station/login", data={"token": api.secrets["operator"]})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/station"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/station", "Max-Age="):
        assert attribute.lower() in cookie.lower(), cookie
    assert api.secrets["operator"] not in cookie
    assert api.secrets["operator"].split("_")[-1] not in cookie

    async with login(api, "operator") as (client, csrf):
        page = await client.get("/station")
        assert 'data-operate="true"' in page.text
        assert csrf not in (page.headers.get("set-cookie") or "")
        assert (await client.get("/station/session")).json() == {
            "name": "operator",
            "role": "operator",
            "operate": True,
        }


async def test_bad_customer_and_missing_tokens_get_the_form_back(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as anon:
        wrong = await anon.post("/station/login", data={"token": "fdt_1_" + "A" * 43})
        assert wrong.status_code == 401
        assert "not valid" in wrong.text
        customer = await anon.post("/station/login", data={"token": api.secrets["acme"]})
        assert customer.status_code == 403
        assert "customer token cannot open the station page" in customer.text
        empty = await anon.post("/station/login", data={"token": ""})
        assert empty.status_code == 400
        for answer in (wrong, customer, empty):
            assert "set-cookie" not in answer.headers
        foreign = await anon.post(
            "/station/login", data={"token": api.secrets["admin"]}, headers={"Origin": "http://evil.example"}
        )
        assert foreign.status_code == 403
        assert (await anon.get("/station/events")).status_code == 401
        assert (await anon.get("/station/session")).status_code == 401
        # A forged cookie is no session either.
        anon.cookies.set(SESSION_COOKIE, "eyJ2IjoxfQ.AAAA", path="/station")
        assert (await anon.get("/station/session")).status_code == 401


async def test_revoking_the_token_ends_the_session(api: Api) -> None:
    async with login(api, "supervisor") as (client, _):
        assert (await client.get("/station/session")).status_code == 200
        await asyncio.to_thread(api.tokens.revoke, "supervisor")
        assert (await client.get("/station/session")).status_code == 401
        assert '<form method="post"' in (await client.get("/station")).text


async def test_page_key_is_private_and_survives_restarts(tmp_path: Path) -> None:
    key = load_page_key(tmp_path)
    path = tmp_path / PAGE_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_page_key(tmp_path) == key
    assert len(key) == 32
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="page key"):
        load_page_key(tmp_path)


# Actions -----------------------------------------------------------------------------------------------


async def test_actions_need_an_operator_a_csrf_token_and_the_same_origin(api: Api) -> None:
    await api.make_lot("lot-1", "acme")
    await api.ledger.set_lot_state("lot-1", LotState.ACTIVE, actor="test")
    pause = "/station/actions/lots/lot-1/pause"

    async with login(api, "supervisor") as (watcher, watcher_csrf):
        refused = await watcher.post(pause, headers={CSRF_HEADER: watcher_csrf})
        assert refused.status_code == 403
        assert "only watch" in refused.json()["detail"]

    async with login(api, "operator") as (client, csrf):
        assert (await client.post(pause)).status_code == 403  # no CSRF token
        assert (await client.post(pause, headers={CSRF_HEADER: csrf[:-2] + "xx"})).status_code == 403
        foreign = {CSRF_HEADER: csrf, "Origin": "http://evil.example"}
        assert (await client.post(pause, headers=foreign)).status_code == 403
        assert (await api.ledger.get_lot("lot-1")).state is LotState.ACTIVE

        same = {CSRF_HEADER: csrf, "Origin": api.url}
        paused = await client.post(pause, headers=same)
        assert paused.status_code == 200, paused.text
        assert paused.json() == {"ok": True, "lot": "lot-1", "state": "paused"}
        # Resuming checks the lot as `lots activate` does: no IDs and no bundle → refused, still paused.
        refused_resume = await client.post("/station/actions/lots/lot-1/resume", headers=same)
        assert refused_resume.status_code == 409
        assert "no CA bundle" in refused_resume.json()["detail"]
        assert "no device IDs" in refused_resume.json()["detail"]
        assert (await api.ledger.get_lot("lot-1")).state is LotState.PAUSED
        await api.make_provisionable("lot-1")
        resumed = await client.post("/station/actions/lots/lot-1/resume", headers=same)
        assert resumed.json()["state"] == "active"
        assert (await client.post("/station/actions/lots/nope/pause", headers=same)).status_code == 404
        # Port actions need a station in this process.
        assert (await client.post("/station/actions/ports/1/retry", headers=same)).status_code == 503
        assert (await client.post("/station/logout", headers=same)).status_code == 204
        assert (await client.get("/station/session")).status_code == 401

    # A bearer token needs no CSRF token (browsers never send it by themselves).
    async with api.client("operator") as bearer:
        assert (await bearer.post(pause)).json()["state"] == "paused"

    trail = [(r.actor, r.action, r.subject) for r in audit(api)]
    assert ("operator", "station.lot.pause", "lot-1") in trail
    assert ("operator", "station.lot.resume", "lot-1") in trail
    assert ("supervisor", "POST /station/actions/lots/{lot}/pause", "lot-1") in trail
    assert await api.ledger.verify_audit() == len(trail)


# Event stream ------------------------------------------------------------------------------------------


async def test_event_stream_starts_with_a_snapshot_keeps_alive_and_ends_on_revocation(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed_module, "KEEPALIVE_S", 0.2)
    monkeypatch.setattr(feed_module, "STOP_POLL_S", 0.05)
    seen: list[tuple[str, str]] = []
    async with (
        login(api, "supervisor") as (client, _),
        client.stream("GET", "/station/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        async for line in response.aiter_lines():
            if line.startswith(":"):
                seen.append(("comment", line[1:].strip()))
                if len(seen) == 2:
                    await asyncio.to_thread(api.tokens.revoke, "supervisor")
            elif line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                seen.append((name, line.removeprefix("data: ")))
    # The stream ended by itself after telling the page to log in again.
    names = [n for n, _ in seen]
    assert names[0] == "snapshot"
    assert names[-1] == "logout"
    assert set(names[1:-1]) == {"comment"}
    snapshot = json.loads(seen[0][1])
    assert snapshot["station"] == api.settings.station.name
    assert snapshot["slots"] == []
    assert seen[1] == ("comment", "keepalive")


# Slot views --------------------------------------------------------------------------------------------


def test_reason_codes_read_as_sentences() -> None:
    for code in CODES:
        text = reason_text(code)
        assert text == REASON_TEXT[code]
        assert "_" not in text
        assert text.endswith(".")
    assert "new code" in reason_text("new_code")
    assert reason_text("The board said no") == "The board said no"
    assert "unknown" in reason_text(None)


def test_grid_follows_the_config_and_grows_to_fit() -> None:
    assert grid_shape(8, 2, 4) == (2, 4)
    assert grid_shape(8, 0, 0) == (3, 3)
    assert grid_shape(8, 0, 2) == (4, 2)
    assert grid_shape(8, 1, 0) == (1, 8)
    assert grid_shape(10, 2, 4) == (3, 4), "no port is ever hidden"
    assert grid_shape(0, 0, 0) == (1, 1)
    order = slot_order(["1", "2", "3", "4"], PageConfig(slots={"3": "A1", "9": "X", "1": "A2"}))
    assert order == ["3", "1", "2", "4"]


def test_bad_slot_labels_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"page\.slots\.1: label"):
        load_settings(None, page={"slots": {"1": ""}})
    with pytest.raises(ConfigError, match=r"page\.rows"):
        load_settings(None, page={"rows": -1})


@dataclass
class FakeStation:
    """The parts of a Station the feed reads."""

    ports: dict[str, PortControl]
    outcomes: Counter[str] = field(default_factory=Counter)
    stopping: bool = False
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class FakeLedger:
    """Lots "lot-1" (factoryd-v1) and "ard-1" (arduino-v1), both drafts: no lot panel."""

    async def list_lots(self) -> list[LotInfo]:
        """The two lots."""
        made = datetime(2026, 1, 1, tzinfo=UTC)
        return [
            LotInfo("lot-1", "acme", LotState.DRAFT, LotProfile(), None, made),
            LotInfo("ard-1", "acme", LotState.DRAFT, LotProfile(protocol="arduino-v1"), None, made),
        ]


class ActiveLedger:
    """One active lot, 100 IDs."""

    async def list_lots(self) -> list[LotInfo]:
        """The lot."""
        made = datetime(2026, 1, 1, tzinfo=UTC)
        return [LotInfo("lot-1", "acme", LotState.ACTIVE, LotProfile(), 100, made)]

    async def progress(self, lot: str) -> LotProgress:
        """Its counts."""
        return LotProgress(total=100, available=80, reserved=5, provisioned=12, void=3)


class BrokenLedger:
    """A database that cannot be reached."""

    async def list_lots(self) -> list[LotInfo]:
        """Fails."""
        raise FactorydError("connection refused")


def _feed(tmp_path: Path, ledger: object | None = None) -> tuple[StationFeed, FakeStation]:
    from factoryd.api.context import ApiContext
    from factoryd.service import StationPaths

    settings = load_settings(None, station={"state_dir": tmp_path}, page={"slots": {"1": "A1"}})
    station = FakeStation({p: PortControl(p) for p in ("1", "2")})
    ctx = ApiContext(
        settings=settings,
        ledger=cast(Any, ledger or FakeLedger()),
        paths=StationPaths(tmp_path),
        passphrase=b"",
        live=LiveState(),
        station=cast(Station, station),
    )
    return StationFeed(ctx), station


def _port(port: str, state: str, *, lot: str = "lot-1", **extra: Any) -> PortUpdate:
    base: dict[str, Any] = {"step": None, "device_id": None, "attempt": 0, "since": datetime.now(UTC)}
    return PortUpdate(port=port, state=PortState(state), lot=lot, **{**base, **extra})


def _event(port: str, kind: JobEventKind, **extra: Any) -> JobEvent:
    base: dict[str, Any] = {
        "lot": "lot-1",
        "job_id": 1,
        "step": None,
        "outcome": None,
        "reason": None,
        "device_id": None,
        "attempt": 1,
        "duration_s": None,
        "at": datetime.now(UTC),
    }
    return JobEvent(kind=kind, port=port, **{**base, **extra})


async def _slot(feed: StationFeed, message: PortUpdate | JobEvent) -> SlotView | None:
    """The slot view the feed sends for ``message`` (None when it sends none)."""
    sent = [view for name, view in await feed.apply(message) if name == "slot"]
    if not sent:
        return None
    view = sent[-1]
    assert isinstance(view, SlotView)
    return view


async def test_slot_views_follow_a_board_and_keep_its_result_on_show(tmp_path: Path) -> None:
    feed, station = _feed(tmp_path)

    async def slot(message: PortUpdate | JobEvent) -> SlotView | None:
        return await _slot(feed, message)

    first = await slot(_port("1", "empty"))
    assert first is not None
    assert (first.label, first.state, first.title) == ("A1", "empty", "Empty")
    # Rescanning an empty port (power on, nothing there) sends nothing: no flicker, no traffic.
    assert await slot(_port("1", "powering", step="power")) is None
    assert await slot(_port("1", "empty")) is None

    await feed.apply(_event("1", "job_started"))
    view = await slot(_port("1", "provisioning", step="keygen", device_id="dev-1"))
    assert view is not None
    assert view.state == "provisioning"
    assert view.title == "Step 7 of 13"  # SECURE_ELEMENT_STEPS: ... firmware, attest, reserve, keygen
    assert "key" in view.detail

    await feed.apply(_event("1", "job_failed", reason="csr_rejected", outcome="failed"))
    failed = await slot(_port("1", "attention", reason="CSR subject CN does not match"))
    assert failed is not None
    assert failed.state == "failed"
    assert failed.detail == REASON_TEXT["csr_rejected"]
    # The next power-on looks at the (same or next) board: the failure stays until a job starts.
    assert await slot(_port("1", "powering", step="power")) is None
    await feed.apply(_event("1", "job_started"))
    assert feed.slot("1").state == "powering"

    # The station's attention state wins and says how to get out of it.
    station.ports["2"].attention = "3 boards failed in a row on port 2 (last: board_timeout)"
    station.ports["2"].failures_in_row = 3
    await feed.apply(_event("2", "job_failed", reason="board_timeout", outcome="failed"))
    attention = feed.slot("2")
    assert attention.state == "attention"
    assert REASON_TEXT["board_timeout"] in attention.detail
    assert "Retry or Acknowledge" in attention.detail
    station.ports["2"].enabled = False
    assert feed.slot("2").enabled is False

    snapshot = await feed.apply(LiveSnapshot({"1": _port("1", "done", device_id="dev-9")}, {}, ()))
    ((name, data),) = snapshot
    assert name == "snapshot"
    assert data is not None
    wire = json.loads(view_json(data))
    assert [s["port"] for s in wire["slots"]] == ["1", "2"]
    assert wire["slots"][0]["state"] == "done"
    assert wire["slots"][0]["device_id"] == "dev-9"
    assert wire["slots"][1]["state"] == "attention"


# Typed feed and step labels ----------------------------------------------------------------------------


def test_every_step_has_a_label_and_a_place() -> None:
    """A new Step needs words on the page and a place in a profile's sequence (or a detour)."""
    for step in Step:
        assert STEP_TEXT.get(step), f"Step.{step.name} has no label on the station page"
        assert step_text(step.value) == STEP_TEXT[step]
        placed = [name for name, profile in PROFILES.items() if step in profile.steps]
        assert placed or step in STEP_DETOURS, f"Step.{step.name} is in no profile's step sequence"
    assert set(STEP_TEXT) == set(Step)
    # Every board profile a lot can name has a sequence (so its slots get a progress bar).
    for name in profile_names():
        steps = PROFILES[name].steps
        assert steps, f"{name} has no step sequence"
        assert len(set(steps)) == len(steps), f"{name} lists a step twice"
        assert not STEP_DETOURS & set(steps)


def test_unknown_steps_get_a_safe_label() -> None:
    assert step_text(None) == UNKNOWN_STEP_TEXT
    assert step_text("") == UNKNOWN_STEP_TEXT
    odd = step_text("warp-drive" * 20)
    assert odd.startswith(UNKNOWN_STEP_TEXT)
    assert len(odd) < len(UNKNOWN_STEP_TEXT) + 50
    assert step_progress("warp-drive", "factoryd-v1") is None
    assert step_progress("keygen", "no-such-profile") is None
    assert step_progress("keygen", None) is None
    assert step_progress(Step.RECHECK, "factoryd-v1") is None
    assert step_progress(Step.POWER, "factoryd-v1") == (1, 13)
    assert step_progress(Step.RECORD, "arduino-v1") == (8, 8)


async def test_a_typed_port_update_becomes_a_slot_view_per_profile(tmp_path: Path) -> None:
    feed, _ = _feed(tmp_path)
    await feed.apply(LiveSnapshot({}, {}, ()))  # reads the lots (and so their profiles)

    store = await _slot(
        feed, _port("2", "provisioning", lot="ard-1", step="store", device_id="ard-7", attempt=2)
    )
    assert store == SlotView(
        port="2",
        label="2",
        enabled=True,
        busy=False,
        device_id="ard-7",
        attempt=2,
        step="store",
        step_index=6,
        step_total=8,
        state="provisioning",
        title="Step 6 of 8",
        detail=STEP_TEXT[Step.STORE],
    )
    rebuild = await _slot(feed, _port("2", "provisioning", lot="ard-1", step="reconstruct"))
    assert rebuild is not None
    assert (rebuild.title, rebuild.detail) == ("Step 7 of 8", STEP_TEXT[Step.RECONSTRUCT])
    assert "reconstruct" not in rebuild.detail

    # The same step on a native lot counts on the native scale.
    csr = await _slot(feed, _port("1", "provisioning", step="csr"))
    assert csr is not None
    assert csr.title == "Step 8 of 13"

    # A step this page does not know: a plain label, no count, no crash.
    odd = await _slot(feed, _port("1", "provisioning", step="warp"))
    assert odd is not None
    assert (odd.title, odd.step_index, odd.step_total) == ("Working", None, None)
    assert odd.detail.startswith(UNKNOWN_STEP_TEXT)

    # A lot the feed has never heard of: the label without a count.
    stranger = await _slot(feed, _port("1", "provisioning", lot="lot-9", step="keygen"))
    assert stranger is not None
    assert (stranger.title, stranger.detail) == ("Working", STEP_TEXT[Step.KEYGEN])


async def test_views_reach_the_wire_as_the_page_script_reads_them(tmp_path: Path) -> None:
    feed, _ = _feed(tmp_path)
    at = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    sent = await feed.apply(
        _event("1", "job_finished", outcome="provisioned", device_id="dev-3", duration_s=12.34, at=at)
    )
    names = [name for name, _ in sent]
    assert names == ["event", "slot", "lot"]  # the slot's first view, then the lot's counts
    event = json.loads(view_json(sent[0][1]))
    assert event == {
        "at": "2026-03-04T05:06:07+00:00",
        "port": "1",
        "label": "A1",
        "text": "Provisioned dev-3 in 12.3 s",
        "tone": "ok",
    }
    assert sent[2][1] is None  # no active lot: the page shows "none active"
    assert view_json(None) == "null"

    slot = json.loads(view_json(feed.slot("1")))
    assert list(slot) == [
        "port",
        "label",
        "enabled",
        "busy",
        "device_id",
        "attempt",
        "step",
        "step_index",
        "step_total",
        "state",
        "title",
        "detail",
    ]
    assert (slot["state"], slot["title"]) == ("unknown", "—")

    ((name, snapshot),) = await feed.apply(LiveSnapshot({}, {}, (_event("2", "job_started", at=at),)))
    assert name == "snapshot"
    wire = json.loads(view_json(snapshot))
    assert set(wire) == {"station", "line", "rows", "columns", "slots", "lot", "events"}
    assert wire["events"] == [
        {
            "at": "2026-03-04T05:06:07+00:00",
            "port": "2",
            "label": "2",
            "text": "Started a board",
            "tone": "info",
        }
    ]


async def test_lot_counts_become_a_typed_lot_view(tmp_path: Path) -> None:
    feed, station = _feed(tmp_path, ActiveLedger())
    station.outcomes.update(failed=2, refused=1)
    counts = LotProgressUpdate(
        "lot-1", total=100, available=70, reserved=5, provisioned=20, void=5, at=datetime.now(UTC)
    )
    ((name, lot),) = await feed.apply(counts)
    assert name == "lot"
    assert lot == LotView(
        name="lot-1",
        customer="acme",
        state=LotState.ACTIVE,
        target=100,
        total=100,
        done=20,
        remaining=75,
        void=5,
        failed=3,
        units_per_hour=0.0,
    )
    assert json.loads(view_json(lot))["state"] == "active"
    # A finished board re-reads the counts from the ledger.
    sent = await feed.apply(_event("1", "job_finished", outcome="provisioned", device_id="dev-1"))
    fresh = sent[-1][1]
    assert isinstance(fresh, LotView)
    assert (fresh.done, fresh.remaining) == (12, 85)

    broken, _ = _feed(tmp_path, BrokenLedger())
    ((_, unavailable),) = await broken.apply(counts)
    assert isinstance(unavailable, LotUnavailable)
    assert json.loads(view_json(unavailable)) == {
        "name": None,
        "error": "Lot information is unavailable (database).",
    }
    # Without the lot list a slot still shows its step, only without a count.
    working = await _slot(broken, _port("1", "provisioning", step="keygen"))
    assert working is not None
    assert (working.title, working.detail) == ("Working", STEP_TEXT[Step.KEYGEN])


async def test_live_state_hands_subscribers_the_typed_events() -> None:
    live = LiveState()
    empty = _port("1", "empty")
    live.port_update(empty)
    async with live.subscribe() as updates:
        first = await anext(updates)
        assert isinstance(first, LiveSnapshot)
        assert first.ports == {"1": empty}
        started = _event("1", "job_started")
        live.job_event(started)
        assert await anext(updates) is started
        live.port_update(later := _port("1", "powering", step="power"))
        assert await anext(updates) is later
        assert first.ports == {"1": empty}, "a snapshot is a copy"
