"""Monitoring as `make up MONITORING=1` runs it: serving's and the tracking server's /metrics
answer only their credentials, and Prometheus (the compose profile) scrapes both, sees the
requests clients sent and the version served, and loads the alert rules with none firing.
Uses the session's trained model (version 1 or later holding the alias)."""

from __future__ import annotations

import pytest
import requests
from stack import Stack, poll

ALERTS = {"ServingErrorRatioHigh", "ServingLatencyP99High", "ServingNoModelServed", "ServingVersionBehindAlias",
          "TrackingServerDown", "ServingDown"}


def prometheus_query(stack: Stack, expr: str) -> list[dict]:
    answer = requests.get(f"{prometheus_url(stack)}/api/v1/query", params={"query": expr}, timeout=10)
    answer.raise_for_status()
    return answer.json()["data"]["result"]


def prometheus_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.env['PROMETHEUS_PORT']}"


def test_serving_metrics_answer_only_the_token(stack: Stack, trained):
    url = f"{stack.serving_url}/metrics"
    assert requests.get(url, timeout=10).status_code == 401
    wrong = requests.get(url, headers={"Authorization": "Bearer " + "x" * 32}, timeout=10)
    assert wrong.status_code == 401 and "invalid_token" in wrong.headers["WWW-Authenticate"]
    body = {"inputs": stack.sample(1)["inputs"]}
    assert requests.post(f"{stack.serving_url}/invocations", json=body, timeout=30).status_code == 200
    scraped = requests.get(url, headers={"Authorization": f"Bearer {stack.env['SERVING_METRICS_TOKEN']}"}, timeout=10)
    assert scraped.status_code == 200
    assert 'serving_requests_total{code="200"' in scraped.text, scraped.text[:2000]


def test_tracking_metrics_need_a_login_and_no_permission(stack: Stack, trained):
    url = f"{stack.mlflow_url}/metrics"
    assert requests.get(url, timeout=10).status_code == 401
    scraped = requests.get(url, auth=("monitoring", stack.env["MONITORING_PASSWORD"]), timeout=10)
    assert scraped.status_code == 200 and "mlflow_http_request" in scraped.text
    # The same account reads no experiment.
    experiments = requests.post(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search", json={"max_results": 10},
                                auth=("monitoring", stack.env["MONITORING_PASSWORD"]), timeout=10)
    assert experiments.status_code == 200 and experiments.json().get("experiments", []) == []


@pytest.fixture
def prometheus(stack: Stack):
    """Prometheus started as `make up MONITORING=1` starts it, and removed afterwards: the
    later tests stop and restart the stack without the monitoring profile."""
    try:
        stack.compose("--profile", "monitoring", "up", "-d", "--wait", "--wait-timeout", "120", "prometheus")
        yield
    finally:
        stack.compose("--profile", "monitoring", "rm", "--stop", "--force", "--volumes", "prometheus", check=False)


def test_prometheus_scrapes_both_and_sees_the_traffic(stack: Stack, trained, prometheus):
    targets_up = poll("Prometheus to scrape serving and the tracking server", lambda: (
        {r["metric"]["job"] for r in prometheus_query(stack, "up == 1")} >= {"serving", "mlflow"}), timeout=90)
    assert targets_up

    body = {"inputs": stack.sample(4)["inputs"]}
    sent = 20
    for _ in range(sent):
        assert requests.post(f"{stack.serving_url}/invocations", json=body, timeout=30).status_code == 200
    served = str(stack.serving_status()["version"])

    def counted() -> float | None:
        result = prometheus_query(stack, f'sum(serving_requests_total{{code="200",version="{served}"}})')
        return result and float(result[0]["value"][1]) >= sent and float(result[0]["value"][1])

    assert poll(f"Prometheus to count {sent} answers from version {served}", counted, timeout=60) >= sent
    versions = {r["value"][1] for r in prometheus_query(stack, "serving_model_version")}
    assert versions == {served}

    rules = requests.get(f"{prometheus_url(stack)}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in rules for rule in group["rules"]}
    assert loaded.keys() >= ALERTS
    firing = [name for name, rule in loaded.items() if rule.get("state") == "firing"]
    assert firing == [], f"alerts firing on a healthy stack: {firing}"

