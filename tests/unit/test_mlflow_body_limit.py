"""tracking/body_limit.py: bodies over the tracking server's limit get 413 before the
app reads them; everything else reaches MLflow's app untouched."""

import asyncio
import json

from tracking.body_limit import BodyLimit


class Recorder:
    """A stand-in for MLflow's app that reads the whole body, then answers 200."""

    def __init__(self):
        self.received = b""
        self.called = False

    async def __call__(self, scope, receive, send):
        self.called = True
        while True:
            message = await receive()
            self.received += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run(app, headers, chunks):
    scope = {"type": "http", "method": "PUT", "path": "/api/2.0/mlflow-artifacts/artifacts/1/x", "headers": headers}
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, body, len(incoming)


def test_a_declared_length_over_the_limit_is_refused_unread():
    inner = Recorder()
    status, body, unread = run(BodyLimit(inner, 1024), [(b"content-length", b"1025")], [b"x" * 1025])
    assert status == 413 and json.loads(body)["error_code"] == "REQUEST_TOO_LARGE"
    assert not inner.called and unread == 1


def test_a_body_at_the_limit_reaches_the_app_whole():
    inner = Recorder()
    status, body, _ = run(BodyLimit(inner, 1024), [(b"content-length", b"1024")], [b"x" * 512, b"y" * 512])
    assert (status, body) == (200, b"ok") and inner.received == b"x" * 512 + b"y" * 512


def test_an_undeclared_body_is_cut_off_once_it_passes_the_limit():
    inner = Recorder()
    status, body, _ = run(BodyLimit(inner, 1024), [(b"transfer-encoding", b"chunked")], [b"x" * 1000, b"y" * 100])
    assert status == 413 and b"REQUEST_TOO_LARGE" in body
