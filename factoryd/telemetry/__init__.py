"""Telemetry: domain events, Prometheus metrics and the MQTT publisher.

``events`` defines what the pipeline reports (no I/O); ``metrics`` and ``mqtt`` are sinks for it;
``payloads`` holds the MQTT topic names and JSON payloads (schemas in ``schemas/``).
"""

from factoryd.telemetry.events import (
    FanOut,
    JobEvent,
    LotProgressUpdate,
    NullSink,
    PortState,
    PortUpdate,
    RecordingSink,
    TelemetrySink,
)
from factoryd.telemetry.metrics import Metrics, make_asgi_app
from factoryd.telemetry.mqtt import MqttPublisher, MqttSettings

__all__ = [
    "FanOut",
    "JobEvent",
    "LotProgressUpdate",
    "Metrics",
    "MqttPublisher",
    "MqttSettings",
    "NullSink",
    "PortState",
    "PortUpdate",
    "RecordingSink",
    "TelemetrySink",
    "make_asgi_app",
]
