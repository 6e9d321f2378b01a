"""One-image requests from 1, 10 and 50 clients at once, a few seconds each, on loopback
through the stack's gateway, as clients reach serving: every answer is a 200 from the
served version.
The figures are printed, never asserted: performance on a shared CI machine says little;
`make bench-load` measures it properly (bench/load_bench.py)."""

from __future__ import annotations

import json

import pytest
from container_memory import container_memory
from stack import Stack

# The benchmarks' load client: raw HTTP/1.1 on asyncio, cheap enough per request that on a
# small machine the measurement is of the server, not of the client.
from bench import common

SECONDS_PER_LEVEL = 3.0
LEVELS = (1, 10, 50)


@pytest.fixture(scope="module")
def served(stack: Stack, trained) -> str:
    return str(stack.wait_served_version(trained["version"], timeout=120)["version"])


@pytest.fixture(scope="module")
def one_image_requests(stack: Stack) -> list[bytes]:
    port = stack.env["SERVING_PORT"]
    images = common.sample_images(32)
    return [common.http_request("POST", "/invocations", f"127.0.0.1:{port}",
                                json.dumps({"inputs": images[i:i + 1].tolist()}).encode(),
                                {"Content-Type": "application/json"})
            for i in range(len(images))]


@pytest.mark.parametrize("concurrency", LEVELS)
def test_concurrent_clients_get_no_errors(stack: Stack, served, one_image_requests, concurrency):
    container = stack.compose("ps", "-q", "serving").stdout.strip()
    before = container_memory(container)
    result = common.run_async(common.drive("127.0.0.1", int(stack.env["SERVING_PORT"]), one_image_requests,
                                           concurrency, SECONDS_PER_LEVEL, timeout_s=60,
                                           tag_header=b"x-model-version"))
    after = container_memory(container)
    summary = result.summary()
    latency = summary["latency_ms"]
    print(f"\n{concurrency} clients, {summary['seconds']:.1f} s: {summary['requests']} requests, "
          f"{common.fmt(summary['requests_per_sec'], ',.1f')} requests/s, p50 {common.fmt(latency['p50'], '.1f')} ms, "
          f"p99 {common.fmt(latency['p99'], '.1f')} ms, {summary['failed']} errors {summary['failures'] or ''}; "
          f"serving memory before: {before}; after: {after}")
    assert summary["requests"] > 0
    assert summary["failed"] == 0, f"{summary['failures']}; first answers: {summary['error_samples']}"
    assert set(result.tags) == {served}, f"answered by versions {set(result.tags)}, served is {served}"
