"""Prometheus metrics: values from domain events, exposition lint (promtool), HTTP and ASGI serving."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from factoryd.errors import ConfigError
from factoryd.telemetry import JobEvent, LotProgressUpdate, Metrics, PortState, PortUpdate
from factoryd.telemetry.metrics import MAX_REASON_LABELS, OTHER_LABEL

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def promtool() -> str:
    """Path of promtool; the test FAILS (not skips) without it, so CI cannot silently lose the lint."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (Debian) provides it")
    return path


def event(kind: str, **kw: Any) -> JobEvent:
    """A job event with defaults."""
    values: dict[str, Any] = {
        "kind": kind,
        "port": "1",
        "lot": "LOT-A",
        "job_id": 1,
        "step": None,
        "outcome": None,
        "reason": None,
        "device_id": "DEV-1",
        "attempt": 1,
        "duration_s": None,
        "at": T0,
    }
    values.update(kw)
    return JobEvent(**values)


@pytest.fixture
def metrics() -> Metrics:
    """A fresh registry per test."""
    return Metrics(station="st-1", line="line-a", version="1.2.3")


def value(m: Metrics, name: str, **labels: str) -> float | None:
    """One sample's value."""
    return m.registry.get_sample_value(name, labels)


def feed_a_shift(m: Metrics) -> None:
    """A few jobs: first-pass ok, ok after a retry, a failure, plus steps, frames, lots and ports."""
    m.job_event(event("job_started"))
    m.job_event(event("step", step="genkey", outcome="ok", duration_s=0.8))
    m.job_event(event("step", step="genkey", outcome="error", duration_s=0.02))
    m.job_event(event("retry", step="genkey"))
    m.job_event(event("job_finished", outcome="ok", duration_s=12.0))
    m.job_event(event("job_finished", outcome="ok", duration_s=25.0, attempt=2))
    m.job_event(
        event("job_failed", step="verify_csr", outcome="failed", reason="csr_rejected", duration_s=4.0)
    )
    m.job_event(event("job_failed", step="write", outcome="aborted", reason="job_aborted"))
    m.port_update(PortUpdate("1", PortState.PROVISIONING, "genkey", "LOT-A", "DEV-1", 1, T0))
    m.port_update(PortUpdate("1", PortState.DONE, None, "LOT-A", "DEV-1", 1, T0))
    m.port_update(PortUpdate("2", PortState.ATTENTION, None, None, None, 0, T0, reason="no_tty"))
    m.lot_progress(LotProgressUpdate("LOT-A", 1000, 700, 3, 290, 7, T0))
    m.frame_sent("1", 3)
    m.frame_received("1", 2)
    m.crc_error("1")
    m.resend("1")
    m.mqtt_state(connected=True, queue_depth=4, dropped_total_increment=2)


def test_metric_values_follow_events(metrics: Metrics) -> None:
    feed_a_shift(metrics)
    m = metrics
    assert value(m, "factoryd_build_info", version="1.2.3", station="st-1", line="line-a") == 1
    assert value(m, "factoryd_jobs_total", outcome="ok", reason="none") == 2
    assert value(m, "factoryd_jobs_total", outcome="failed", reason="csr_rejected") == 1
    assert value(m, "factoryd_jobs_total", outcome="aborted", reason="job_aborted") == 1
    assert value(m, "factoryd_jobs_first_pass_total", outcome="pass") == 1
    assert value(m, "factoryd_jobs_first_pass_total", outcome="fail") == 3
    assert value(m, "factoryd_job_failures_total", step="verify_csr", reason="csr_rejected") == 1
    assert value(m, "factoryd_job_duration_seconds_count", outcome="ok") == 2
    assert value(m, "factoryd_job_duration_seconds_sum", outcome="ok") == 37.0
    assert value(m, "factoryd_job_duration_seconds_bucket", outcome="ok", le="15.0") == 1
    assert value(m, "factoryd_step_duration_seconds_count", step="genkey", outcome="ok") == 1
    assert value(m, "factoryd_step_duration_seconds_count", step="genkey", outcome="error") == 1
    assert value(m, "factoryd_retries_total", step="genkey") == 1
    # One-hot: exactly one state per port is 1.
    for port, current in (("1", "done"), ("2", "attention")):
        states = {s.value: value(m, "factoryd_port_state", port=port, state=s.value) for s in PortState}
        assert states == {s.value: (1.0 if s.value == current else 0.0) for s in PortState}
    assert value(m, "factoryd_port_state_since_timestamp_seconds", port="1") == T0.timestamp()
    assert value(m, "factoryd_lot_ids", lot="LOT-A", state="available") == 700
    assert value(m, "factoryd_lot_ids", lot="LOT-A", state="void") == 7
    assert value(m, "factoryd_frames_sent_total", port="1") == 3
    assert value(m, "factoryd_frames_received_total", port="1") == 2
    assert value(m, "factoryd_frame_crc_errors_total", port="1") == 1
    assert value(m, "factoryd_frame_resends_total", port="1") == 1
    assert value(m, "factoryd_mqtt_connected") == 1
    assert value(m, "factoryd_mqtt_queue_depth") == 4
    assert value(m, "factoryd_mqtt_dropped_total") == 2


def test_no_device_id_in_any_label(metrics: Metrics) -> None:
    feed_a_shift(metrics)
    label_names = {name for fam in metrics.registry.collect() for s in fam.samples for name in s.labels}
    assert label_names <= {
        "version",
        "station",
        "line",
        "outcome",
        "reason",
        "step",
        "port",
        "state",
        "lot",
        "le",
    }
    assert "DEV-1" not in metrics.exposition().decode()


def test_label_values_are_cleaned_and_capped(metrics: Metrics) -> None:
    metrics.job_event(event("job_failed", step="Write Cert!", reason="Board said: NO/NACK"))
    assert value(metrics, "factoryd_job_failures_total", step="write_cert", reason="board_said:_no_nack") == 1
    for i in range(MAX_REASON_LABELS + 10):
        metrics.job_event(event("job_failed", step="write", reason=f"r{i}"))
    assert value(metrics, "factoryd_jobs_total", outcome="failed", reason=OTHER_LABEL) is not None
    reasons = {
        s.labels["reason"]
        for fam in metrics.registry.collect()
        if fam.name == "factoryd_jobs"
        for s in fam.samples
    }
    assert len(reasons) <= MAX_REASON_LABELS + 2  # + "none" and "other"


def test_series_exist_before_the_first_job(metrics: Metrics) -> None:
    assert value(metrics, "factoryd_jobs_total", outcome="ok", reason="none") == 0
    assert value(metrics, "factoryd_jobs_first_pass_total", outcome="pass") == 0
    assert value(metrics, "factoryd_jobs_first_pass_total", outcome="fail") == 0
    assert value(metrics, "factoryd_mqtt_connected") == 0


def test_registries_are_independent() -> None:
    a = Metrics(station="a", line="l", version="1")
    b = Metrics(station="b", line="l", version="1")
    a.frame_sent("1")
    assert value(a, "factoryd_frames_sent_total", port="1") == 1
    assert value(b, "factoryd_frames_sent_total", port="1") is None


def test_promtool_check_metrics_is_clean(metrics: Metrics) -> None:
    feed_a_shift(metrics)
    result = subprocess.run(  # noqa: S603 - fixed tool, our own input
        [promtool(), "check", "metrics"],
        input=metrics.exposition(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    out = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, out
    assert out.strip() == "", f"promtool lint findings:\n{out}"


async def test_serve_exposes_metrics_over_http(metrics: Metrics) -> None:
    metrics.frame_sent("7")
    async with metrics.serve("127.0.0.1", 0) as port, httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    assert 'factoryd_frames_sent_total{port="7"} 1.0' in response.text
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/metrics")


async def test_serve_refuses_a_busy_port(metrics: Metrics) -> None:
    async with metrics.serve("127.0.0.1", 0) as port:
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            async with metrics.serve("127.0.0.1", port):
                pass


async def test_asgi_app_serves_the_same_registry(metrics: Metrics) -> None:
    metrics.crc_error("3")
    transport = httpx.ASGITransport(app=metrics.asgi_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://station") as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert 'factoryd_frame_crc_errors_total{port="3"} 1.0' in response.text
