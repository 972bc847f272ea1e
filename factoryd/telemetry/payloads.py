"""MQTT topics and JSON payloads (schema version 1), apart from any connection.

Every payload is a JSON object with ``"schema": 1``; the JSON Schemas in ``schemas/`` describe them
and ``docs/mqtt.md`` documents them. Timestamps are RFC 3339 strings in UTC.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Literal

from factoryd.errors import ConfigError
from factoryd.telemetry.events import JobEvent, LotProgressUpdate, PortUpdate
from factoryd.telemetry.reasons import reason_text

__all__ = [
    "PAYLOAD_SCHEMA_VERSION",
    "SCHEMA_NAMES",
    "Topics",
    "encode",
    "job_event_payload",
    "load_schema",
    "lot_progress_payload",
    "port_state_payload",
    "status_payload",
    "topic_segment",
]

PAYLOAD_SCHEMA_VERSION = 1
SCHEMA_NAMES = ("status", "port_state", "event", "lot_progress")

# Characters that would change the topic tree (level separator, wildcards) or that MQTT forbids;
# "%" itself is escaped so that the encoding can be undone.
_TOPIC_ESCAPES = {"%": "%25", "/": "%2F", "+": "%2B", "#": "%23", "\0": "%00"}


def topic_segment(value: str) -> str:
    """Make one topic level from a port or lot name: ``/ + # % NUL`` percent-encoded, never empty."""
    if not value:
        return "%"  # an empty level would merge with its neighbour; "%" alone can never be produced else
    return "".join(_TOPIC_ESCAPES.get(c, c) for c in value)


def _check_name(field: str, value: str) -> None:
    if not value or any(c in value for c in "/+#\0"):
        raise ConfigError(f"mqtt {field} {value!r} must be non-empty without '/', '+', '#' or NUL")


class Topics:
    """The topic names under ``factory/{line}/{station}``."""

    def __init__(self, prefix_template: str, *, line: str, station: str) -> None:
        _check_name("line", line)
        _check_name("station", station)
        try:
            prefix = prefix_template.format(line=line, station=station)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"mqtt prefix_template {prefix_template!r} is invalid: only {{line}} and {{station}} "
                f"may be used ({exc})"
            ) from exc
        if not prefix or prefix.startswith("/") or prefix.endswith("/") or any(c in prefix for c in "+#\0"):
            raise ConfigError(
                f"mqtt prefix {prefix!r} (from {prefix_template!r}) must be non-empty, "
                "without wildcards and without a leading or trailing '/'"
            )
        self.prefix = prefix
        self.status = f"{prefix}/status"
        self.events = f"{prefix}/events"

    def port_state(self, port: str) -> str:
        """Topic of a port's retained state."""
        return f"{self.prefix}/ports/{topic_segment(port)}/state"

    def lot_progress(self, lot: str) -> str:
        """Topic of a lot's retained progress."""
        return f"{self.prefix}/lots/{topic_segment(lot)}/progress"


def _ts(value: datetime) -> str:
    # Naive datetimes are refused when events are built; UTC keeps every station comparable.
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def status_payload(state: Literal["online", "offline"], *, version: str, at: datetime) -> dict[str, Any]:
    """Payload of ``status``."""
    return {"schema": PAYLOAD_SCHEMA_VERSION, "state": state, "version": version, "at": _ts(at)}


def port_state_payload(update: PortUpdate) -> dict[str, Any]:
    """Payload of ``ports/{n}/state``."""
    return {
        "schema": PAYLOAD_SCHEMA_VERSION,
        "port": update.port,
        "state": str(update.state),
        "step": update.step,
        "lot": update.lot,
        "device_id": update.device_id,
        "attempt": update.attempt,
        "since": _ts(update.since),
        "reason": update.reason,
        # The same sentence the station page shows (a line display fed from MQTT needs no table).
        "operator_text": reason_text(update.reason) if update.reason else None,
    }


def job_event_payload(event: JobEvent) -> dict[str, Any]:
    """Payload of one message on ``events``."""
    return {
        "schema": PAYLOAD_SCHEMA_VERSION,
        "kind": event.kind,
        "port": event.port,
        "lot": event.lot,
        "job_id": event.job_id,
        "step": event.step,
        "outcome": event.outcome,
        "reason": event.reason,
        "operator_text": reason_text(event.reason) if event.reason else None,
        "device_id": event.device_id,
        "attempt": event.attempt,
        "duration_s": event.duration_s,
        "at": _ts(event.at),
    }


def lot_progress_payload(update: LotProgressUpdate) -> dict[str, Any]:
    """Payload of ``lots/{lot}/progress``."""
    return {
        "schema": PAYLOAD_SCHEMA_VERSION,
        "lot": update.lot,
        "total": update.total,
        "available": update.available,
        "reserved": update.reserved,
        "provisioned": update.provisioned,
        "void": update.void,
        "at": _ts(update.at),
    }


def encode(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (events refuse non-finite numbers when built, so this cannot fail)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of one payload kind (one of :data:`SCHEMA_NAMES`)."""
    if name not in SCHEMA_NAMES:
        raise ValueError(f"unknown payload schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    text = resources.files("factoryd.telemetry").joinpath("schemas", f"{name}.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
