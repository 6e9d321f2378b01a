"""The tracking server's app: MLflow's basic-auth app, or with single sign-on the
mlflow-oidc-auth plugin's, behind a request body limit.

Registered as the MLflow apps `stack-basic-auth` and `stack-oidc-auth` (pyproject.toml), so
`mlflow server --app-name ...` runs them with everything `mlflow server` sets up.
Artifact uploads are staged in the server's /tmp, a tmpfs that counts against its memory
limit; a body larger than MLFLOW_MAX_BODY_BYTES is answered 413 from its Content-Length
before a byte of it is read, and one whose length is not declared (chunked) is cut off with
413 once it passes the limit. Every route is covered, MLflow's Flask API and its FastAPI
routes (the artifact upload among them) alike.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_BODY_BYTES = 512 * 1024 * 1024


class BodyTooLarge(Exception):
    pass


def _refusal(limit: int, declared: int | None) -> tuple[dict, bytes]:
    size = f"{declared} bytes" if declared is not None else "larger than the limit"
    body = json.dumps({
        "error_code": "REQUEST_TOO_LARGE",
        "message": f"The request body is {size}; this server takes at most {limit} bytes "
                   "(MLFLOW_MAX_BODY_SIZE).",
    }).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, body


class BodyLimit:
    """Pure ASGI middleware: nothing is buffered, the app sees the same receive stream."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = int(value) if value.strip().isdigit() else None
        if declared is not None and declared > self.limit:
            return await self._refuse(send, declared)

        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, None)

    async def _refuse(self, send: Send, declared: int | None) -> None:
        start, body = _refusal(self.limit, declared)
        await send(start)
        await send({"type": "http.response.body", "body": body})


def _limit() -> int:
    return int(os.environ.get("MLFLOW_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))


def create_app() -> ASGIApp:
    """The factory `mlflow server` hands to uvicorn, in every worker."""
    from mlflow.server.auth import create_app as basic_auth_app

    from tracking import auth_guard, auth_lookups

    app = basic_auth_app()
    # The permission checks' repeated user and run lookups, remembered (auth_lookups.py).
    auth_lookups.install()
    auth_guard.allow_metrics_readers()
    return BodyLimit(app, _limit())


def create_oidc_app() -> ASGIApp:
    """The same with single sign-on: the mlflow-oidc-auth plugin's app (AUTH_MODE=oidc)."""
    from mlflow_oidc_auth.app import app as oidc_app

    return BodyLimit(oidc_app, _limit())
