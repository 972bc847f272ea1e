"""Telemetry events, the fan-out sink, topics and JSON payloads against their schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from factoryd.errors import ConfigError
from factoryd.telemetry import (
    FanOut,
    JobEvent,
    LotProgressUpdate,
    NullSink,
    PortState,
    PortUpdate,
    RecordingSink,
    TelemetrySink,
)
from factoryd.telemetry.payloads import (
    SCHEMA_NAMES,
    Topics,
    encode,
    job_event_payload,
    load_schema,
    lot_progress_payload,
    port_state_payload,
    status_payload,
    topic_segment,
)

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
CET = timezone(timedelta(hours=1))


def job(**kw: Any) -> JobEvent:
    """A job event with defaults."""
    values: dict[str, Any] = {
        "kind": "job_failed",
        "port": "3",
        "lot": "LOT-A",
        "job_id": 17,
        "step": "verify_csr",
        "outcome": "failed",
        "reason": "csr_rejected",
        "device_id": "DEV-1",
        "attempt": 1,
        "duration_s": 4.2,
        "at": T0,
    }
    values.update(kw)
    return JobEvent(**values)


def validate(name: str, payload: dict[str, Any]) -> None:
    """Validate against the shipped schema, formats included."""
    jsonschema.validate(
        payload, load_schema(name), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_shipped_schemas_are_valid_and_documented(name: str) -> None:
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema"] == {"const": 1, "description": "payload schema version"}
    assert schema["additionalProperties"] is False
    text = (ROOT / "factoryd" / "telemetry" / "schemas" / f"{name}.json").read_text().rstrip("\n")
    assert text in (ROOT / "docs" / "mqtt.md").read_text(), f"docs/mqtt.md is out of date for {name}"


def test_payloads_validate_and_use_utc() -> None:
    update = PortUpdate("3", PortState.ATTENTION, None, None, None, 0, T0.astimezone(CET), reason="no_tty")
    payload = port_state_payload(update)
    validate("port_state", payload)
    assert payload["since"] == "2025-03-01T08:00:00Z"
    assert payload["state"] == "attention"
    validate("event", job_event_payload(job()))
    nulls = dict.fromkeys(("step", "outcome", "reason", "device_id", "job_id", "duration_s", "lot"))
    validate("event", job_event_payload(job(kind="job_started", **nulls)))
    validate("lot_progress", lot_progress_payload(LotProgressUpdate("LOT-A", 10, 5, 1, 3, 1, T0)))
    validate("status", status_payload("online", version="0.1.0", at=T0))
    assert json.loads(encode(job_event_payload(job())))["duration_s"] == 4.2


@pytest.mark.parametrize(
    ("payload_name", "payload", "broken"),
    [
        ("event", job_event_payload(job()), {"kind": "exploded"}),
        ("event", job_event_payload(job()), {"schema": 2}),
        (
            "port_state",
            port_state_payload(PortUpdate("1", PortState.IDLE, None, None, None, 0, T0)),
            {"extra": 1},
        ),
        ("status", status_payload("offline", version="1", at=T0), {"at": "2025-03-01 08:00"}),
        ("lot_progress", lot_progress_payload(LotProgressUpdate("L", 1, 1, 0, 0, 0, T0)), {"void": -1}),
    ],
)
def test_schemas_reject_broken_payloads(
    payload_name: str, payload: dict[str, Any], broken: dict[str, Any]
) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(payload_name, payload | broken)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: PortUpdate("1", PortState.IDLE, None, None, None, 0, datetime(2025, 1, 1)),
            "timezone-aware",
        ),
        (lambda: PortUpdate("", PortState.IDLE, None, None, None, 0, T0), "port must not be empty"),
        (lambda: PortUpdate("1", PortState.IDLE, None, None, None, -1, T0), "attempt must be >= 0"),
        (lambda: job(kind="exploded"), "not a known event kind"),
        (lambda: job(duration_s=float("inf")), "finite number"),
        (lambda: job(duration_s=float("nan")), "finite number"),
        (lambda: job(duration_s=-1.0), "finite number"),
        (lambda: LotProgressUpdate("L", 1, -1, 0, 0, 0, T0), "available must be >= 0"),
        (lambda: LotProgressUpdate("", 1, 1, 0, 0, 0, T0), "lot must not be empty"),
    ],
)
def test_events_refuse_bad_values(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_topics_escape_names_that_would_change_the_tree() -> None:
    topics = Topics("factory/{line}/{station}", line="line-a", station="st-1")
    assert topics.status == "factory/line-a/st-1/status"
    assert topics.events == "factory/line-a/st-1/events"
    assert topics.port_state("1-1.4") == "factory/line-a/st-1/ports/1-1.4/state"
    assert topics.lot_progress("ACME/2025#1+x%") == "factory/line-a/st-1/lots/ACME%2F2025%231%2Bx%25/progress"
    assert topic_segment("") == "%"
    assert Topics("plant7/{station}", line="l", station="s").status == "plant7/s/status"


@pytest.mark.parametrize(
    ("template", "line", "station", "message"),
    [
        ("factory/{line}/{station}", "a/b", "s", "line 'a/b'"),
        ("factory/{line}/{station}", "l", "", "station ''"),
        ("factory/{line}/{site}", "l", "s", "only {line} and {station}"),
        ("/factory/{line}", "l", "s", "leading or trailing"),
        ("factory/+/{station}", "l", "s", "without wildcards"),
    ],
)
def test_topics_refuse_bad_prefixes(template: str, line: str, station: str, message: str) -> None:
    with pytest.raises(
        ConfigError, match=message.replace("{", r"\{").replace("}", r"\}").replace("+", r"\+")
    ):
        Topics(template, line=line, station=station)


class ExplodingSink(NullSink):
    """Breaks the sink contract on purpose."""

    def job_event(self, event: JobEvent) -> None:
        raise RuntimeError("boom")

    def port_update(self, update: PortUpdate) -> None:
        raise RuntimeError("boom")

    def lot_progress(self, update: LotProgressUpdate) -> None:
        raise RuntimeError("boom")


def test_fan_out_reaches_every_sink_even_if_one_raises() -> None:
    first, last = RecordingSink(), RecordingSink()
    fan = FanOut([first, ExplodingSink(), last])
    update = PortUpdate("1", PortState.POWERING, None, "L", None, 1, T0)
    progress = LotProgressUpdate("L", 1, 1, 0, 0, 0, T0)
    fan.port_update(update)
    fan.job_event(job())
    fan.lot_progress(progress)
    for sink in (first, last):
        assert sink.ports == [update]
        assert sink.events == [job()]
        assert sink.lots == [progress]


def test_sinks_satisfy_the_protocol() -> None:
    assert isinstance(FanOut([]), TelemetrySink)
    assert isinstance(NullSink(), TelemetrySink)
    assert isinstance(RecordingSink(), TelemetrySink)
    assert [s.value for s in PortState] == [
        "empty", "disabled", "powering", "enumerating", "provisioning", "done", "failed", "attention", "idle",
    ]  # fmt: skip


def test_payloads_carry_the_operator_sentence_the_page_shows() -> None:
    refused = PortUpdate("3", PortState.ATTENTION, None, None, None, 0, T0, reason="attestation_chain")
    payload = port_state_payload(refused)
    validate("port_state", payload)
    assert payload["operator_text"] == "Not a genuine part: put it aside."
    idle = port_state_payload(PortUpdate("3", PortState.EMPTY, None, None, None, 0, T0))
    assert idle["operator_text"] is None
