"""Metrics across worker processes, as gunicorn runs them: each process writes its own files
in PROMETHEUS_MULTIPROC_DIR, and a scrape answered by any one of them shows the sum of the
counters, each live worker's gauges, and nothing of a worker that died."""

import os
import subprocess
import sys
import textwrap

from prometheus_client.parser import text_string_to_metric_families

from serving import metrics_files

TOKEN = "s3cret-metrics-token-0123456789"

WORKER = textwrap.dedent("""
    import os, sys
    from serving import metrics
    requests, version, alias = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    for _ in range(requests):
        metrics.REQUESTS.labels("200", version).inc()
    metrics.IN_FLIGHT.inc()
    metrics.version_prepared(0.5)
    metrics.version_swapped(version)
    metrics.alias_seen(alias)
    metrics.start_memory_sampler()
    print(os.getpid())
""")

SCRAPE = textwrap.dedent("""
    import sys
    from pydantic import SecretStr
    from serving import metrics
    answer = metrics.metrics_answer(SecretStr(sys.argv[1]), b"Bearer " + sys.argv[1].encode())
    assert answer["status"] == 200, answer
    sys.stdout.write(answer["body"].decode())
""")


def run(code, directory, *args):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


def scrape(directory):
    """{name: [(labels, value)]} as a worker of this directory answers GET /metrics."""
    found = {}
    for family in text_string_to_metric_families(run(SCRAPE, directory, TOKEN)):
        for s in family.samples:
            found.setdefault(s.name, []).append((s.labels, s.value))
    return found


def by_pid(found, name):
    return {labels["pid"]: value for labels, value in found[name]}


def test_workers_are_summed_and_dead_ones_dropped(tmp_path, monkeypatch):
    directory = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    metrics_files.reset()  # what gunicorn's master does first
    first = run(WORKER, directory, "2", "3", "3").strip()
    second = run(WORKER, directory, "5", "2", "3").strip()

    found = scrape(directory)
    assert sorted(found["serving_requests_total"], key=str) == [
        ({"code": "200", "version": "2"}, 5.0),
        ({"code": "200", "version": "3"}, 2.0),
    ]
    assert found["serving_model_loads_total"] == [({}, 2.0)]
    assert found["serving_model_swaps_total"] == [({}, 2.0)]
    # One series per worker, the worker answering the scrape included (it serves nothing yet).
    served = by_pid(found, "serving_model_version")
    assert served[first] == 3 and served[second] == 2
    assert all(v == 0 for pid, v in served.items() if pid not in (first, second))
    assert by_pid(found, "serving_model_alias_version")[first] == 3
    assert found["serving_requests_in_flight"] == [({}, 2.0)]
    memory = by_pid(found, "serving_worker_resident_memory_bytes")
    assert memory[first] > 0 and memory[second] > 0

    # gunicorn's child_exit hook: the first worker died.
    metrics_files.forget_worker(int(first))
    found = scrape(directory)
    assert first not in by_pid(found, "serving_model_version")
    assert by_pid(found, "serving_model_version")[second] == 2
    assert found["serving_requests_in_flight"] == [({}, 1.0)]
    # Its counts stay in the totals: a counter must never go back.
    assert sum(v for _, v in found["serving_requests_total"]) == 7

    # A new run of the master starts from nothing.
    metrics_files.reset()
    assert list(directory.iterdir()) == []
    assert "serving_requests_total" not in scrape(directory)
