"""The container's process model for real: `python -m serving` (the image's entry point) -> gunicorn with
two uvicorn workers on a free loopback port, driven over HTTP like a client would."""

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import ONE_IMAGE_BODY, wait_until

JSON = {"content-type": "application/json"}
METRICS_TOKEN = "metrics-token-for-the-process-test"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_for(registry, tmp_path):
    """Starts `python -m serving` for a model name; every process started is killed after."""
    started = []

    def start(name):
        port = free_port()
        metrics_dir = tmp_path / "metrics"
        metrics_dir.mkdir()
        (metrics_dir / "counter_1.db").write_bytes(b"left by an earlier run")  # gunicorn's master removes it
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_TRACKING_URI": registry.tracking_uri,
            "MODEL_NAME": name,
            "MODEL_SIGNING_PUBLIC_KEY": registry.keys["MODEL_SIGNING_PUBLIC_KEY"],
            "ALIAS_POLL_SECONDS": "0.5",
            "SERVING_WORKERS": "2",
            "SERVING_CONTAINER_PORT": str(port),
            "SERVING_BIND_HOST": "127.0.0.1",
            "SERVING_CACHE_DIR": str(tmp_path / "cache"),
            "SERVING_GRACEFUL_TIMEOUT": "10",
            "SERVING_METRICS_TOKEN": METRICS_TOKEN,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        log_path = tmp_path / "serving.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "serving"], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(proc)
        return proc, f"http://127.0.0.1:{port}", env, log_path

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def server(registry, server_for):
    name = registry.new_model("good-a", "good-b")
    proc, base, env, log_path = server_for(name)
    return proc, base, name, env, log_path


def healthy(env, *flags):
    check = subprocess.run(
        [sys.executable, "-m", "serving.healthcheck", *flags], env=env, capture_output=True, timeout=10
    )
    return check.returncode == 0


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def scrape(base):
    """{(name, sorted labels): value} of GET /metrics, over every worker."""
    answer = requests.get(f"{base}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def per_worker(found, name):
    return {dict(labels)["pid"]: value for (n, labels), value in found.items() if n == name}


def consecutive(url, version, count):
    """True once `count` requests in a row are answered by `version` (new connections
    each, so that both workers get asked)."""
    for _ in range(count):
        r = requests.post(url, data=ONE_IMAGE_BODY, headers=JSON, timeout=10)
        if r.status_code != 200 or r.headers.get("x-model-version") != version:
            return False
    return True


def answers_from_the_first(url, count):
    """Versions (or statuses) of the first `count` answers the server gives at all, the very
    first included: connection refusals before the port opens are retried."""
    def first():
        try:
            return requests.post(url, data=ONE_IMAGE_BODY, headers=JSON, timeout=60)
        except requests.ConnectionError:
            return None

    answer = wait_until(first, timeout=60, interval=0.05, what="the server's first answer")
    answers = [answer] + [requests.post(url, data=ONE_IMAGE_BODY, headers=JSON, timeout=10) for _ in range(count - 1)]
    return [a.headers.get("x-model-version") if a.status_code == 200 else a.status_code for a in answers]


def test_a_started_server_answers_only_once_every_worker_serves(registry, server_for):
    # The alias is set before the start: no worker takes a request before its model is
    # loaded, so the very first answer is already a scored one, from either worker.
    name = registry.new_model("good-a")
    registry.point(name, 1)
    proc, base, env, log_path = server_for(name)
    assert answers_from_the_first(f"{base}/invocations", 40) == ["1"] * 40


def test_container_process_waits_serves_follows_and_stops(registry, server):
    proc, base, name, env, log_path = server
    invocations = f"{base}/invocations"

    # Up and healthy before any model exists, saying what it waits for.
    wait_until(lambda: healthy(env), timeout=60, interval=0.2, what="healthcheck to pass")
    assert not healthy(env, "--serving")  # ready to take over from another container: not yet
    waiting = requests.post(invocations, data=ONE_IMAGE_BODY, headers=JSON, timeout=10)
    assert waiting.status_code == 503
    assert f"waiting for {name}@production" in waiting.json()["message"]
    wait_until(
        lambda: f"waiting for models:/{name}@production" in log_path.read_text(),
        timeout=30, what="waiting message in the log",
    )

    registry.point(name, 1)
    wait_until(lambda: consecutive(invocations, "1", 20), timeout=60, what="both workers on v1")
    assert healthy(env) and healthy(env, "--serving")
    status = requests.get(f"{base}/status", timeout=10).json()
    assert status["state"] == "serving" and status["torch_threads"] == 1

    # Clients keep calling while the alias moves; none of them may see a failure.
    results, stop = [], threading.Event()

    def client():
        with requests.Session() as session:
            while not stop.is_set() and len(results) < 50000:
                try:
                    r = session.post(invocations, data=ONE_IMAGE_BODY, headers=JSON, timeout=10)
                    results.append((r.status_code, r.headers.get("x-model-version")))
                except requests.RequestException as e:
                    results.append((repr(e), None))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 100, timeout=30, what="traffic on v1")
        registry.point(name, 2)
        wait_until(
            lambda: [v for _, v in results[-40:]] == ["2"] * 40,
            timeout=60, what="all answers from v2",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:5]
    assert {v for _, v in results} == {"1", "2"}
    print(f"\n{len(results)} requests over HTTP while the alias moved, none failed")

    # GET /metrics, answered by either worker, counts the requests of both, and shows each
    # worker's version beside the alias holder's and its memory.
    assert requests.get(f"{base}/metrics", timeout=10).status_code == 401
    assert not (Path(env["PROMETHEUS_MULTIPROC_DIR"]) / "counter_1.db").exists()
    found = wait_until(lambda: (f := scrape(base)) and set(per_worker(f, "serving_model_version").values()) == {2}
                       and f, timeout=30, what="both workers reported on version 2")
    assert len(per_worker(found, "serving_model_version")) == 2
    assert set(per_worker(found, "serving_model_alias_version").values()) == {2}
    assert all(rss > 10_000_000 for rss in per_worker(found, "serving_worker_resident_memory_bytes").values())
    answered = {v: found.get(("serving_requests_total", (("code", "200"), ("version", v))), 0) for v in "12"}
    # The client threads' answers, plus the requests that waited for each worker to switch.
    assert answered["1"] + answered["2"] >= len(results)
    assert answered["2"] >= sum(1 for _, v in results if v == "2")
    assert found[("serving_requests_total", (("code", "503"), ("version", "none")))] >= 1  # before version 1
    assert found[("serving_model_swaps_total", ())] == 4  # two versions, two workers
    assert found[("serving_requests_in_flight", ())] == 0

    # A worker that dies is replaced; its gauges go with it (gunicorn's child_exit hook), its
    # counts stay.
    dead = sorted(per_worker(found, "serving_model_version"))[0]
    os.kill(int(dead), signal.SIGKILL)
    after = wait_until(lambda: (f := scrape(base)) and len(per_worker(f, "serving_model_version")) == 2
                       and dead not in per_worker(f, "serving_model_version") and f,
                       timeout=60, what="a new worker in place of the killed one")
    assert dead not in per_worker(after, "serving_worker_resident_memory_bytes")
    assert after[("serving_model_swaps_total", ())] >= 4
    assert after[("serving_requests_total", (("code", "200"), ("version", "2")))] >= answered["2"]

    # A body over SERVING_MAX_BODY_BYTES (8 MiB) is refused, and the client reads the 413.
    big = requests.post(invocations, data=b"0" * 10_000_000, headers=JSON, timeout=30)
    assert big.status_code == 413
    assert "SERVING_MAX_BODY_BYTES" in big.json()["message"]

    # SIGTERM (docker stop) ends the server cleanly: status 0, no worker left behind, the
    # port closed.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    wait_until(lambda: not process_group_alive(proc.pid), timeout=10, what="every worker to exit")
    with pytest.raises(requests.ConnectionError):
        requests.post(invocations, data=ONE_IMAGE_BODY, headers=JSON, timeout=10)
    log = log_path.read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("setting, value, line", [
    ("SERVING_WORKERS", "many", "serving: SERVING_WORKERS='many' is not valid: expected an integer from 1 to 64"),
    ("MODEL_SIGNING_PUBLIC_KEY", "", "serving: MODEL_SIGNING_PUBLIC_KEY is not set; run 'make env' "
                                     "(it writes the model signing key pair)"),
    ("MODEL_SIGNING_PUBLIC_KEY", "private", "serving: MODEL_SIGNING_PUBLIC_KEY is not valid: "
                                            "expected a PEM public key as one base64 line"),
])
def test_nonsense_settings_fail_at_start_with_one_line(registry, setting, value, line):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MODEL_NAME": "fashion",
        "MODEL_SIGNING_PUBLIC_KEY": registry.keys["MODEL_SIGNING_PUBLIC_KEY"],
    }
    # The private half where the public one belongs is refused too: serving must not hold it.
    env[setting] = registry.keys["MODEL_SIGNING_KEY"] if value == "private" else value
    run = subprocess.run([sys.executable, "-m", "serving"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [line]


def test_a_restarted_container_answers_from_its_cache_while_the_registry_is_down(registry, server, tmp_path):
    proc, base, name, env, log_path = server
    invocations = f"{base}/invocations"
    registry.point(name, 1)
    wait_until(lambda: healthy(env, "--serving"), timeout=60, interval=0.2, what="version 1 served")
    wait_until(lambda: consecutive(invocations, "1", 20), timeout=60, what="both workers on v1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

    # The same cache (the volume), and a tracking server that does not answer at all.
    down = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    with open(tmp_path / "restarted.log", "wb") as log:
        restarted = subprocess.Popen([sys.executable, "-m", "serving"], env=down, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert answers_from_the_first(invocations, 40) == ["1"] * 40
        assert healthy(down, "--serving")
        status = requests.get(f"{base}/status", timeout=10).json()
        assert status["warm_started_version"] == "1" and status["alias_version"] is None
    finally:
        os.killpg(restarted.pid, signal.SIGKILL)
        restarted.wait(10)
