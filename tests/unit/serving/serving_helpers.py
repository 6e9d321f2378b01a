"""Helpers for the serving tests: polling with a deadline, and a small in-process HTTP
driver for ASGI apps (no network, no extra client library)."""

import asyncio
import json
import time

import numpy as np

ONE_IMAGE = {"inputs": np.full((1, 1, 28, 28), 0.5, dtype=np.float32).tolist()}
ONE_IMAGE_BODY = json.dumps(ONE_IMAGE).encode()

POLL = 0.2  # seconds: the watchers' own schedule in these tests, not a sleep in them


def wait_until(predicate, timeout=30.0, interval=0.02, what="condition"):
    """Poll until predicate() is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(predicate, timeout=30.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lower-case str -> str
        self.body = body

    def json(self):
        return json.loads(self.body)

    @property
    def version(self):
        return self.headers.get("x-model-version")


async def call(app, method, path, body=b"", headers=None, chunks=None):
    """One request through the ASGI app, as uvicorn would deliver it. `chunks` streams
    the body in pieces (an iterable of bytes) instead of one message."""
    headers = dict(headers or {})
    if chunks is None and body and "content-length" not in headers:
        headers["content-length"] = str(len(body))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    pieces = iter(chunks) if chunks is not None else iter([body])
    pending = [next(pieces, b"")]
    done = asyncio.Event()

    async def receive():
        if pending:
            chunk = pending.pop()
            following = next(pieces, None)
            if following is not None:
                pending.append(following)
            return {"type": "http.request", "body": chunk, "more_body": following is not None}
        await done.wait()
        return {"type": "http.disconnect"}

    start, parts = {}, []

    async def send(message):
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    done.set()
    response_headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return Response(start.get("status"), response_headers, b"".join(parts))


def post_json(app, body, content_type="application/json", **kw):
    return call(app, "POST", "/invocations", body, {"content-type": content_type}, **kw)
