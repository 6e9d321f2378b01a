"""Malformed requests get a 4xx with a message a person can act on; serving keeps answering."""

from __future__ import annotations

import json

import pytest
import requests

from stack import Stack

IMAGE = [[[0.0] * 28] * 28]

BAD_REQUESTS = {
    "not json": (b"this is not json", "application/json"),
    "empty body": (b"", "application/json"),
    "missing inputs key": (json.dumps({"images": [IMAGE]}).encode(), "application/json"),
    "wrong shape": (json.dumps({"inputs": [[[0.0] * 27] * 28]}).encode(), "application/json"),
    "wrong dtype": (json.dumps({"inputs": [[[["a"] * 28] * 28]]}).encode(), "application/json"),
    "nan pixel": (json.dumps({"inputs": [[[[float("nan")] * 28] * 28]]}).encode(), "application/json"),
    "10 MB body": (b'{"inputs": [' + b"0.0," * (10 * 1024 * 1024 // 4) + b"0.0]}", "application/json"),
}


@pytest.fixture(scope="module")
def served(stack: Stack, trained):
    return stack.wait_served_version(trained["version"], timeout=120)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_a_readable_4xx(stack: Stack, served, case):
    body, content_type = BAD_REQUESTS[case]
    response = requests.post(f"{stack.serving_url}/invocations", data=body,
                             headers={"Content-Type": content_type}, timeout=60)
    assert 400 <= response.status_code < 500, f"{case}: {response.status_code} {response.text[:300]}"
    assert len(response.text) > 10 and "Traceback" not in response.text, response.text[:300]
    # And the server is still there for the next, well-formed request.
    ok = requests.post(f"{stack.serving_url}/invocations", json={"inputs": [IMAGE]}, timeout=30)
    assert ok.status_code == 200
