"""monitoring/: Prometheus scrapes serving and the tracking server with their credentials, every
alert the stack promises exists with a promtool test that fires it and one that keeps it quiet,
and the rules and the dashboard query only metrics serving exports. promtool itself
(monitoring/promtool-test.sh) checks the PromQL and runs those tests."""

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from serving import metrics

MONITORING = Path(__file__).parents[3] / "monitoring"
ALERTS = {
    "ServingErrorRatioHigh",  # 5xx ratio over a threshold
    "ServingLatencyP99High",  # p99 latency over a budget
    "ServingNoModelServed",
    "ServingVersionBehindAlias",  # served version != alias holder for 2 minutes
    "TrackingServerDown",  # up == 0
    "ServingDown",
}
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}


def rules():
    return {
        rule["alert"]: rule
        for path in sorted((MONITORING / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    }


def exported_names():
    assert metrics.MULTIPROCESS is False  # in-process: serving's metrics are in the default registry
    families = [f for f in REGISTRY.collect() if f.name.startswith("serving_")]
    assert families
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}


def used_names(expr):
    return set(re.findall(r"\bserving_[a-z_]+", expr))


def test_prometheus_scrapes_both_services_with_credentials_from_files():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["serving"]["static_configs"] == [{"targets": ["serving:8080"]}]
    assert jobs["serving"]["authorization"] == {"type": "Bearer",
                                                "credentials_file": "/run/secrets/serving_metrics_token"}
    assert jobs["mlflow"]["static_configs"] == [{"targets": ["mlflow:5000"]}]
    assert jobs["mlflow"]["basic_auth"] == {"username": "monitoring",
                                            "password_file": "/run/secrets/mlflow_monitoring_password"}
    # No secret written into the file itself.
    assert not re.search(r"\b(credentials|password|bearer_token):", (MONITORING / "prometheus.yml").read_text())


def test_every_alert_exists_and_says_what_to_do():
    found = rules()
    assert set(found) == ALERTS
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("page", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule["for"], name
    assert found["ServingVersionBehindAlias"]["for"] == "2m"
    assert "up{job=\"mlflow\"} == 0" in found["TrackingServerDown"]["expr"]


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_every_alert_has_a_promtool_test_that_fires_it_and_one_that_does_not(alert):
    cases = [
        case
        for path in sorted((MONITORING / "tests").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["tests"]
        for case in group["alert_rule_test"]
        if case["alertname"] == alert
    ]
    assert any(case.get("exp_alerts") for case in cases), f"nothing makes {alert} fire"
    assert any(not case.get("exp_alerts") for case in cases), f"nothing checks {alert} stays quiet"


def test_rules_and_dashboard_use_only_metrics_serving_exports():
    exported = exported_names()
    for name, rule in rules().items():
        assert used_names(rule["expr"]) <= exported, name
    dashboard = json.loads((MONITORING / "grafana" / "serving.json").read_text())
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert used_names(target["expr"]) <= exported, panel["title"]
            used |= used_names(target["expr"])
    # The main serving panels: rate by status/version, latency, rows, in flight, versions, memory.
    for name in ("serving_requests_total", "serving_request_duration_seconds_bucket", "serving_request_rows_bucket",
                 "serving_requests_in_flight", "serving_model_version", "serving_model_alias_version",
                 "serving_worker_resident_memory_bytes"):
        assert name in used, name
