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

from factoryd.api import page as page_module
from factoryd.api.page import (
    CSRF_HEADER,
    PAGE_KEY_FILE,
    REASON_TEXT,
    SESSION_COOKIE,
    StationFeed,
    grid_shape,
    load_page_key,
    reason_text,
    slot_order,
)
from factoryd.config import PageConfig, load_settings
from factoryd.errors import ConfigError
from factoryd.jobs.scheduler import PortControl, Station
from factoryd.ledger import LotState
from factoryd.ledger.core import create_ledger_engine
from factoryd.ledger.tables import AuditEntryRow
from factoryd.telemetry.live import LiveState
from tests.helpers.api import Api, running_api

STATIC = Path(page_module.__file__).parent / "static"
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
    monkeypatch.setattr(page_module, "KEEPALIVE_S", 0.2)
    monkeypatch.setattr(page_module, "STOP_POLL_S", 0.05)
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


class FakeLedger:
    """No lots."""

    async def list_lots(self) -> list[Any]:
        """None."""
        return []


def _feed(tmp_path: Path) -> tuple[StationFeed, FakeStation]:
    from factoryd.api.context import ApiContext
    from factoryd.service import StationPaths

    settings = load_settings(None, station={"state_dir": tmp_path}, page={"slots": {"1": "A1"}})
    station = FakeStation({p: PortControl(p) for p in ("1", "2")})
    ctx = ApiContext(
        settings=settings,
        ledger=cast(Any, FakeLedger()),
        paths=StationPaths(tmp_path),
        passphrase=b"",
        live=LiveState(),
        station=cast(Station, station),
    )
    return StationFeed(ctx), station


def _port(port: str, state: str, **extra: Any) -> dict[str, Any]:
    base = {"type": "port", "port": port, "state": state, "step": None, "lot": "lot-1"}
    return {**base, "device_id": None, "attempt": 0, "since": datetime.now(UTC).isoformat(), **extra}


def _event(port: str, kind: str, **extra: Any) -> dict[str, Any]:
    base = {"type": "event", "kind": kind, "port": port, "lot": "lot-1", "job_id": 1, "step": None}
    return {
        **base,
        "outcome": None,
        "reason": None,
        "device_id": None,
        "attempt": 1,
        "duration_s": None,
        **extra,
    }


async def test_slot_views_follow_a_board_and_keep_its_result_on_show(tmp_path: Path) -> None:
    feed, station = _feed(tmp_path)

    async def slot(message: dict[str, Any]) -> dict[str, Any] | None:
        sent = [data for name, data in await feed.apply(message) if name == "slot"]
        return sent[-1] if sent else None

    first = await slot(_port("1", "empty"))
    assert first is not None
    assert (first["label"], first["state"], first["title"]) == ("A1", "empty", "Empty")
    # Rescanning an empty port (power on, nothing there) sends nothing: no flicker, no traffic.
    assert await slot(_port("1", "powering", step="power")) is None
    assert await slot(_port("1", "empty")) is None

    await feed.apply(_event("1", "job_started"))
    view = await slot(_port("1", "provisioning", step="keygen", device_id="dev-1"))
    assert view is not None
    assert view["state"] == "provisioning"
    assert view["title"] == "Step 6 of 12"
    assert "key" in view["detail"]

    await feed.apply(_event("1", "job_failed", reason="csr_rejected", outcome="failed"))
    failed = await slot(_port("1", "attention", reason="CSR subject CN does not match"))
    assert failed is not None
    assert failed["state"] == "failed"
    assert failed["detail"] == REASON_TEXT["csr_rejected"]
    # The next power-on looks at the (same or next) board: the failure stays until a job starts.
    assert await slot(_port("1", "powering", step="power")) is None
    await feed.apply(_event("1", "job_started"))
    assert feed.slot("1")["state"] == "powering"

    # The station's attention state wins and says how to get out of it.
    station.ports["2"].attention = "3 boards failed in a row on port 2 (last: board_timeout)"
    station.ports["2"].failures_in_row = 3
    await feed.apply(_event("2", "job_failed", reason="board_timeout", outcome="failed"))
    attention = feed.slot("2")
    assert attention["state"] == "attention"
    assert REASON_TEXT["board_timeout"] in attention["detail"]
    assert "Retry or Acknowledge" in attention["detail"]
    station.ports["2"].enabled = False
    assert feed.slot("2")["enabled"] is False

    snapshot = await feed.apply(
        {"type": "snapshot", "ports": {"1": _port("1", "done", device_id="dev-9")}, "lots": {}, "events": []}
    )
    ((name, data),) = snapshot
    assert name == "snapshot"
    assert data is not None
    assert [s["port"] for s in data["slots"]] == ["1", "2"]
    assert data["slots"][0]["state"] == "done"
    assert data["slots"][0]["device_id"] == "dev-9"
    assert data["slots"][1]["state"] == "attention"
