"""Deployment files: Prometheus config and alert rules (promtool), Grafana dashboard and docs in sync."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from factoryd.signer.metrics import SignerMetrics
from factoryd.telemetry import JobEvent, LotProgressUpdate, Metrics, PortState, PortUpdate

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "factoryd-line.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)

# Grafana macros and variables replaced by plain values so promtool can parse the expressions.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$__range": "1h", "$line": ".*", "$station": ".*"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; FAIL (not skip) if it is missing so CI cannot silently lose these checks."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (Debian) provides it")
    return subprocess.run(  # noqa: S603 - fixed tool, repository files
        [path, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def dashboard() -> dict[str, Any]:
    """The dashboard JSON."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panel_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard."""
    return [
        (p["title"], t["expr"]) for p in dashboard()["panels"] if p["type"] != "row" for t in p["targets"]
    ]


def full_metrics() -> Metrics:
    """A registry in which every metric family has samples."""
    m = Metrics(station="st1", line="l1", version="1")
    for kind, extra in (
        ("step", {"step": "genkey", "outcome": "ok", "duration_s": 1.0}),
        ("retry", {"step": "genkey"}),
        ("job_finished", {"duration_s": 10.0}),
        ("job_failed", {"step": "csr", "reason": "csr_rejected", "duration_s": 3.0}),
    ):
        values: dict[str, Any] = {"port": "1", "lot": "L", "job_id": 1, "step": None, "outcome": None}
        values |= {"reason": None, "device_id": None, "attempt": 1, "duration_s": None, "at": T0}
        m.job_event(JobEvent(kind=kind, **(values | extra)))  # type: ignore[arg-type]
    m.port_update(PortUpdate("1", PortState.IDLE, None, None, None, 0, T0))
    m.lot_progress(LotProgressUpdate("L", 10, 9, 0, 1, 0, T0))
    for count in (m.frame_sent, m.frame_received, m.crc_error, m.resend):
        count("1")
    m.mqtt_state(connected=True, queue_depth=0, dropped_total_increment=1)
    return m


def sample_names(m: Metrics) -> set[str]:
    """Every sample name in the exposition (with _total, _bucket, ... suffixes)."""
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def full_signer_metrics() -> SignerMetrics:
    """The signing service's registry (its own /metrics, docs/signer.md) with samples in every family."""
    m = SignerMetrics(signer="signer-1", version="1")
    m.issued(lot="L", station="st1", replayed=False, superseded=True, duration_s=0.01, remaining=3)
    m.refused(lot="L", station="st1", reason="quota_exhausted", duration_s=0.01)
    return m


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout  # the rules glob matches the rules file


def test_alert_rules_are_valid() -> None:
    rules = sorted((PROMETHEUS / "rules").glob("*.yml"))
    assert rules, "no rule files"
    result = promtool("check", "rules", *rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", PROMETHEUS / "tests" / "factoryd-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((PROMETHEUS / "rules" / "factoryd-alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "tests" / "factoryd-alerts.test.yml").read_text())
    tested = {
        case["alertname"]
        for t in tests["tests"]
        for case in t["alert_rule_test"]
        if case.get("exp_alerts")  # a test that only expects silence proves nothing on its own
    }
    assert alerts == tested
    assert {"FactorydDown", "FactorydMqttDisconnected", "FactorydPortStuck"} <= alerts


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    rules: list[dict[str, str]] = []
    for i, (_title, grafana_expr) in enumerate(panel_exprs()):
        expr = grafana_expr
        for macro, value in GRAFANA_SUBSTITUTIONS.items():
            expr = expr.replace(macro, value)
        assert "$" not in expr, f"unhandled Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:panel_query_{i}", "expr": expr})
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", rules_file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_rules_use_only_existing_metrics() -> None:
    known = sample_names(full_metrics()) | {
        s.name for fam in full_signer_metrics().registry.collect() for s in fam.samples
    }
    texts = {"dashboard": DASHBOARD.read_text()}
    texts |= {p.name: p.read_text() for p in (PROMETHEUS / "rules").glob("*.yml")}
    for where, text in texts.items():
        used = set(re.findall(r"\bfactoryd_[a-z_]+", text))
        assert used, where
        assert used <= known, f"{where} uses unknown metrics: {sorted(used - known)}"


def test_dashboard_shape() -> None:
    d = dashboard()
    assert d["uid"] == "factoryd-line"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in panels}
    for wanted in (
        "Units per hour",
        "First-pass yield (1 h)",
        "Port states",
        "Failures by step and reason (time range)",
        "Job duration p50 / p95",
        "Device IDs remaining by lot",
        "Time to ID exhaustion by lot",
        "MQTT connection",
    ):
        assert wanted in titles
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        assert p["gridPos"]["x"] >= 0, p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    variables = {v["name"] for v in d["templating"]["list"]}
    assert variables == {"datasource", "line", "station"}
    port_states = next(p for p in panels if p["title"] == "Port states")
    mapping = port_states["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert sorted(m["text"] for m in mapping.values()) == sorted(s.value for s in PortState)


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "factoryd.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    datasource = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "factoryd-prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["type"] == "prometheus"


def test_metrics_doc_lists_every_metric_and_panel_query() -> None:
    doc = METRICS_DOC.read_text()
    for fam in [*full_metrics().registry.collect(), *full_signer_metrics().registry.collect()]:
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        assert f"`{name}`" in doc, f"docs/metrics.md does not document {name}"
    for title, expr in panel_exprs():
        assert expr in doc, f"docs/metrics.md lacks the query of panel {title!r}"
