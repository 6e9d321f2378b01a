"""Malformed requests get a 4xx with a message a person can act on, never a 5xx: serving's
/invocations (the corpus in tests/malformed_requests.py, sent over a real socket) and the
tracking API with the trainer's credentials. Serving keeps answering after each one, and
its memory stays flat however often they come."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
import requests
from container_memory import MIB, container_memory
from malformed_requests import CASES, ONE_IMAGE
from stack import Stack

# Memory: one pass over the corpus to warm up (allocator arenas, MLflow's lazy imports),
# then this many more, after which the serving container's anonymous memory may have
# grown by at most GROWTH_BOUND. Leaking one 8 MiB body per pass would show as 160 MiB.
MEASURED_PASSES = 20
GROWTH_BOUND_BYTES = 32 * MIB


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def send(stack: Stack, request: bytes, timeout: float = 60) -> Answer:
    """One request on a connection of its own, sent byte for byte as given; the first
    answer read back (the server closes the connection after it)."""
    port = int(stack.env["SERVING_PORT"])
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before the whole body went out; the answer is read below
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed with part of the request unread; what arrived first still counts
    head, separator, rest = received.partition(b"\r\n\r\n")
    assert separator, f"no HTTP answer, only {received[:300]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return Answer(int(status_line.split()[1]), headers, rest[:length])


def one_image_answers(stack: Stack, version: str) -> None:
    ok = requests.post(f"{stack.serving_url}/invocations", data=ONE_IMAGE,
                       headers={"Content-Type": "application/json"}, timeout=30)
    assert ok.status_code == 200 and ok.headers["X-Model-Version"] == version, ok.text[:300]
    assert len(ok.json()["predictions"][0]) == 10


@pytest.fixture(scope="module")
def served(stack: Stack, trained) -> str:
    return str(stack.wait_served_version(trained["version"], timeout=120)["version"])


@pytest.fixture(scope="module")
def serving_container(stack: Stack) -> str:
    return stack.compose("ps", "-q", "serving").stdout.strip()


# --- serving -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_malformed_invocation_gets_a_readable_4xx(stack: Stack, served, case):
    port = stack.env["SERVING_PORT"]
    answer = send(stack, case.wire_bytes(f"127.0.0.1:{port}"))
    assert 400 <= answer.status < 500, f"{case.name}: {answer.status} {answer.text[:300]}"
    if case.status is not None:
        assert answer.status == case.status, f"{case.name}: {answer.status} {answer.text[:300]}"
    assert "Traceback" not in answer.text and len(answer.text) > 10, answer.text[:300]
    if case.refused_by_http_parser:
        # The gateway's parser answers before any serving container sees the request.
        assert answer.status == 400 and answer.headers["content-type"] == "application/json", answer.headers
        assert json.loads(answer.body)["error_code"] == "BAD_REQUEST", answer.text
    else:
        assert answer.headers["content-type"] == "application/json", answer.headers
        document = json.loads(answer.body)
        assert document["error_code"] and document["message"], document
        assert answer.headers["x-model-version"] == served
    one_image_answers(stack, served)


def test_memory_stays_flat_under_malformed_requests(stack: Stack, served, serving_container):
    port = stack.env["SERVING_PORT"]
    # A stalled body is answered only after serving's idle timeout: sent once, above.
    requests_ = [case.wire_bytes(f"127.0.0.1:{port}") for case in CASES if not case.stalls]

    def one_pass() -> None:
        for request in requests_:
            assert 400 <= send(stack, request).status < 500

    one_pass()
    warm = container_memory(serving_container)
    for _ in range(MEASURED_PASSES):
        one_pass()
    after = container_memory(serving_container)
    one_image_answers(stack, served)
    growth = after.anon_bytes - warm.anon_bytes
    print(f"\nserving memory, {len(requests_)} malformed requests per pass: after 1 warm-up pass {warm}; "
          f"after {MEASURED_PASSES} more passes {after}; anonymous growth {growth / MIB:+.1f} MiB "
          f"(bound {GROWTH_BOUND_BYTES / MIB:.0f} MiB)")
    assert growth < GROWTH_BOUND_BYTES, f"serving grew {growth / MIB:.1f} MiB over {MEASURED_PASSES} passes"


# --- the tracking API, as the trainer ----------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
LONG_KEY = "k" * 1000


@dataclass
class TrackingCase:
    name: str
    method: str
    path: str  # under /api/2.0/mlflow/; {run} and {experiment} are filled in
    body: object = None  # bytes as sent, or a document sent as JSON
    params: dict = field(default_factory=dict)
    auth: str = "trainer"  # "trainer", "none", "wrong password", "unknown user", or an Authorization header
    status: int | None = None


TRACKING_CASES = [
    TrackingCase("body not JSON", "POST", "runs/create", b"{not json"),
    TrackingCase("truncated body", "POST", "runs/create", b'{"experiment_id": "'),
    TrackingCase("JSON list body", "POST", "runs/create", [1, 2]),
    TrackingCase("experiment id as a list", "POST", "runs/create", {"experiment_id": ["{experiment}"]}, status=400),
    TrackingCase("experiment id as an object", "POST", "runs/create", {"experiment_id": {"id": 1}}, status=400),
    TrackingCase("run id as a list", "POST", "runs/log-metric",
                 {"run_id": ["{run}"], "key": "m", "value": 1.0, "timestamp": 1}, status=400),
    TrackingCase("body nested 100k deep", "POST", "runs/create", DEEP, status=400),
    TrackingCase("double-encoded body that is not JSON", "POST", "runs/search", b'"not json"', status=400),
    TrackingCase("start time as a word", "POST", "runs/create",
                 {"experiment_id": "{experiment}", "start_time": "yesterday"}),
    TrackingCase("metric without key", "POST", "runs/log-metric", {"run_id": "{run}", "value": 1.0, "timestamp": 1}),
    TrackingCase("metric value a word", "POST", "runs/log-metric",
                 {"run_id": "{run}", "key": "m", "value": "high", "timestamp": 1}),
    TrackingCase("metric value null", "POST", "runs/log-metric",
                 {"run_id": "{run}", "key": "m", "value": None, "timestamp": 1}),
    TrackingCase("batch of 1001 metrics", "POST", "runs/log-batch",
                 {"run_id": "{run}", "metrics": [{"key": "m", "value": 1.0, "timestamp": 1, "step": i}
                                                 for i in range(1001)]}),
    TrackingCase("batch metrics not a list", "POST", "runs/log-batch", {"run_id": "{run}", "metrics": "x"}),
    TrackingCase("param key of 1000 characters", "POST", "runs/log-parameter",
                 {"run_id": "{run}", "key": LONG_KEY, "value": "v"}),
    TrackingCase("metric key of 1000 characters", "POST", "runs/log-metric",
                 {"run_id": "{run}", "key": LONG_KEY, "value": 1.0, "timestamp": 1}),
    TrackingCase("tag key of 1000 characters", "POST", "runs/set-tag",
                 {"run_id": "{run}", "key": LONG_KEY, "value": "v"}),
    TrackingCase("experiment name of 5000 characters", "POST", "experiments/create", {"name": "e" * 5000}),
    TrackingCase("param key with a path in it", "POST", "runs/log-parameter",
                 {"run_id": "{run}", "key": "../etc", "value": "v"}),
    TrackingCase("run that does not exist", "GET", "runs/get", params={"run_id": "0" * 32}),
    TrackingCase("experiment that does not exist", "GET", "experiments/get", params={"experiment_id": "987654321"}),
    TrackingCase("experiment id not a number", "GET", "experiments/get", params={"experiment_id": "abc"}),
    TrackingCase("model version not a number", "GET", "model-versions/get",
                 params={"name": "{model}", "version": "abc"}),
    TrackingCase("registered model that does not exist", "GET", "registered-models/get",
                 params={"name": "no-such-model"}),
    TrackingCase("run search with a broken filter", "POST", "runs/search",
                 {"experiment_ids": ["{experiment}"], "filter": "metrics.m >>> 1"}),
    TrackingCase("run search for 10^12 results", "POST", "runs/search",
                 {"experiment_ids": ["{experiment}"], "max_results": 10**12}),
    TrackingCase("run search with a forged page token", "POST", "runs/search",
                 {"experiment_ids": ["{experiment}"], "page_token": "garbage"}),
    TrackingCase("GET on a POST endpoint", "GET", "runs/create"),
    TrackingCase("DELETE on a GET endpoint", "DELETE", "runs/get"),
    TrackingCase("endpoint that does not exist", "GET", "runs/nowhere"),
    TrackingCase("no credentials", "GET", "experiments/get", params={"experiment_id": "{experiment}"}, auth="none",
                 status=401),
    TrackingCase("wrong password", "GET", "experiments/get", params={"experiment_id": "{experiment}"},
                 auth="wrong password", status=401),
    TrackingCase("unknown user", "GET", "experiments/get", params={"experiment_id": "{experiment}"},
                 auth="unknown user", status=401),
    TrackingCase("Basic credentials that are not base64", "GET", "experiments/get",
                 params={"experiment_id": "{experiment}"}, auth="Basic !!!not-base64", status=401),
    TrackingCase("Bearer token instead of a password", "GET", "experiments/get",
                 params={"experiment_id": "{experiment}"}, auth="Bearer abc", status=401),
]


def _filled(value, names: dict[str, str]):
    if isinstance(value, str):
        return value.format(**names) if "{" in value else value
    if isinstance(value, list):
        return [_filled(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _filled(v, names) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def trainer_run(stack: Stack, trained) -> dict[str, str]:
    """A run of the trainer's own, in its experiment, for the cases to aim at."""
    auth = stack.credentials("trainer")
    api = f"{stack.mlflow_url}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", auth=auth, timeout=30,
                              params={"experiment_name": stack.env.get("EXPERIMENT_NAME", "fashion-mnist")})
    experiment.raise_for_status()
    experiment_id = experiment.json()["experiment"]["experiment_id"]
    run = requests.post(f"{api}/runs/create", auth=auth, json={"experiment_id": experiment_id}, timeout=30)
    run.raise_for_status()
    return {"experiment": experiment_id, "run": run.json()["run"]["info"]["run_id"],
            "model": stack.env.get("MODEL_NAME", "fashion-mnist-cnn")}


@pytest.mark.parametrize("case", TRACKING_CASES, ids=lambda case: case.name)
def test_malformed_tracking_call_gets_a_4xx(stack: Stack, trainer_run, case: TrackingCase):
    user, password = stack.credentials("trainer")
    auth, headers = None, {}
    if case.auth == "trainer":
        auth = (user, password)
    elif case.auth == "wrong password":
        auth = (user, password + "x")
    elif case.auth == "unknown user":
        auth = ("nobody-" + user, password)
    elif case.auth != "none":
        headers["Authorization"] = case.auth
    body = _filled(case.body, trainer_run)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    if body is not None:
        headers["Content-Type"] = "application/json"
    response = requests.request(case.method, f"{stack.mlflow_url}/api/2.0/mlflow/{case.path}", data=body,
                                params=_filled(case.params, trainer_run), auth=auth, headers=headers, timeout=60)
    assert 400 <= response.status_code < 500, f"{case.name}: {response.status_code} {response.text[:300]}"
    if case.status is not None:
        assert response.status_code == case.status, f"{case.name}: {response.status_code} {response.text[:300]}"
    assert response.text.strip() and "Traceback" not in response.text, response.text[:300]
    # The server is still there for the trainer's next, well-formed call.
    ok = requests.get(f"{stack.mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": trainer_run["run"]},
                      auth=(user, password), timeout=30)
    assert ok.status_code == 200, ok.text[:300]
