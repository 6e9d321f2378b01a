"""The ASGI app each gunicorn worker runs: routes, body limits, version headers, and the
hand-off to the model the alias watcher currently serves.

    /invocations  POST  scored with the current model (503 while waiting)
    /status       GET   which version this worker serves, and why not another
    /ping /health GET   200 while the worker runs, waiting or serving (the healthcheck)
    /version      GET   MLflow's version
    anything else       MLflow's scoring app for the current model (its 404/405)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from serving import config, metrics, prediction_log, scoring
from serving import open_inference as oip
from serving.model_store import LoadedModel
from serving.rollout import Rollout, ShadowCopy, json_predictions
from serving.scoring import Reply, error_reply
from serving.watcher import AliasWatcher

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from serving.model_store import ModelStore

# The ASGI interface, as uvicorn calls the app.
Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Iterable[tuple[bytes, bytes]]

log = logging.getLogger("serving")

# Bodies up to this size are scored on the event loop: for one or a few images the hop to
# a thread costs more than scoring itself (measured: 2,670 vs 2,100 requests/s with two
# workers). Larger bodies go to the scoring thread so that /ping never waits long.
INLINE_MAX_BYTES = 64 * 1024

# After refusing an oversized body, read and discard up to this much of it (for at most
# DRAIN_SECONDS) so that the client gets to read the 413 instead of a reset connection.
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 10.0

# A client that declares more body than it sends would otherwise hold its connection (and
# what it sent so far, up to the body limit) for as long as it likes. No byte of the body
# for this long answers 408, as nginx's client_body_timeout does (60 s there; a scoring
# client on a working network never pauses this long mid-body).
BODY_IDLE_SECONDS = 10.0

# A worker starts accepting connections once its watcher has served the cached version or
# had its first look at the registry (a download included), so that a restarted container
# never has one worker answering while another still answers 503. A look that takes longer
# (a large download, an unreachable registry) stops holding the worker back after this
# long: gunicorn replaces a worker that is silent for 60 s, and it is silent until then.
FIRST_LOOK_SECONDS = 45.0

ErrorReply = Callable[[int, str], Reply]


class _ClientGone(Exception):
    pass


def _configure_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] serving: %(message)s")
        )
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _identity_only(coding: bytes) -> bool:
    """True when a Content-Encoding header lists no coding but "identity" (or none)."""
    return all(c.strip().lower() in (b"", b"identity") for c in coding.split(b","))


def _media_type(value: bytes) -> tuple[str, dict[str, str]]:
    mime, *rest = value.decode("latin-1").split(";")
    params = {}
    for part in rest:
        key, _, val = part.partition("=")
        params[key.strip().lower()] = val.strip().strip('"').lower()
    return mime.strip().lower(), params


class _Batcher:
    """Scores together the small tensor requests that reach one worker in the same turn
    of its event loop: one predict call for all their rows, each request answered with
    its own rows. It never waits for a batch to fill: a request waits only for the
    requests that were already parsed beside it, and the batch is scored on the loop's
    next turn. Requests holding different versions (during a swap) are scored apart."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._pending: list[tuple[LoadedModel, np.ndarray, scoring.Encoder, asyncio.Future]] = []
        self.requests = 0  # requests scored in a batch of two or more
        self.predict_calls = 0  # predict calls those batches took

    def submit(self, model: LoadedModel, data: np.ndarray,
               encode: scoring.Encoder = scoring.mlflow_reply) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((model, data, encode, future))
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        while pending:
            model = pending[0][0]
            batch, rest, rows = [], [], 0
            for item in pending:
                n = item[1].shape[0] if item[1].ndim else 1
                if item[0] is model and (not batch or rows + n <= self.max_rows):
                    batch.append(item)
                    rows += n
                else:
                    rest.append(item)
            pending = rest
            if len(batch) > 1:
                self.requests += len(batch)
                self.predict_calls += 1
            try:
                replies = scoring.predict_batch(model, [item[1] for item in batch], [item[2] for item in batch])
            except Exception:  # a future left unresolved would hang its request for good
                log.exception("scoring a batch failed")
                replies = [error_reply(500, "Internal error while scoring")] * len(batch)
            for (*_, future), reply in zip(batch, replies, strict=True):
                if not future.cancelled():
                    future.set_result(reply)


class ServingApp:
    def __init__(self, settings: config.Settings, registry: MlflowClient | None = None,
                 store: ModelStore | None = None) -> None:
        self.settings = settings
        self.watcher = AliasWatcher(settings, registry=registry, store=store, warm_start=settings.warm_start)
        # The challenger (canary or shadow) beside the production alias.
        self.rollout = Rollout(settings, self.watcher, registry=registry, store=store)
        # One scoring thread per worker for large bodies: torch's intra-op threads do the
        # parallel work, and workers x threads stay within the cores.
        self._executor: ThreadPoolExecutor | None = None
        self._name_header = [(b"x-model-name", settings.model_name.encode("latin-1", "replace"))]
        self._batcher = _Batcher(settings.batch_max_rows) if settings.batch_max_rows > 1 else None
        self.body_idle_seconds = BODY_IDLE_SECONDS
        self.prediction_log = prediction_log.from_settings(settings)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._executor is None:
            _configure_logging()
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="scoring")
            self.watcher.start()
            self.prediction_log.start()
            metrics.start_memory_sampler()
            self.rollout.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.rollout.stop()
        self.prediction_log.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await asyncio.to_thread(self.watcher.first_look.wait, FIRST_LOOK_SECONDS)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- ASGI entry ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        if kind != "http":
            return  # no websockets here; the server closes the connection
        if self._executor is None:
            self.start()  # servers that skip lifespan events still get a watcher
        # A client that left before sending its whole body has nobody to answer.
        with contextlib.suppress(_ClientGone):
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = self.watcher.current
        path = scope["path"]
        method = scope["method"]
        if path == "/invocations" and method == "POST":
            return await metrics.measure_invocation(
                lambda receive, send: self._invocations(model, scope, receive, send), receive, send)
        if path == "/v2" or path.startswith("/v2/"):
            return await self._open_inference(model, scope, receive, send)
        if method in ("GET", "HEAD"):
            if path == "/metrics":
                return await metrics.send_metrics(self.settings.metrics_token, _header(scope, b"authorization"),
                                                  send, model.headers if model is not None else self._name_header)
            if path in ("/ping", "/health"):
                state = "serving" if model is not None else "waiting"
                return await self._send(send, Reply(200, b'{"state": "%s"}' % state.encode()), model)
            if path == "/status":
                body = json.dumps(self._status(model)).encode()
                return await self._send(send, Reply(200, body), model)
            if path == "/version":
                from mlflow.version import VERSION

                return await self._send(send, Reply(200, VERSION.encode()), model)
        if model is None:
            return await self._send(send, error_reply(404, f"No route {method} {path}"), model)
        # MLflow's app answers what it knows (e.g. 405 for GET /invocations) and 404 else.
        body = await self._read_body(scope, receive, send, model)
        if body is not None:
            await self._forward(model, scope, receive, send, body)

    def _status(self, model: LoadedModel | None) -> dict[str, Any]:
        status = self.watcher.status()
        batcher = self._batcher
        status["batching"] = {
            "enabled": bool(batcher is not None and model is not None and model.batchable),
            "max_rows": self.settings.batch_max_rows,
            "batched_requests": batcher.requests if batcher else 0,
            "batch_predict_calls": batcher.predict_calls if batcher else 0,
        }
        status["rollout"] = self.rollout.status()
        return status

    # -- /invocations ------------------------------------------------------------------------

    async def _invocations(self, model: LoadedModel | None, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body(scope, receive, send, model)
        if body is None:
            return
        if model is None:
            return await self._not_served_yet(send, error_reply)

        async def answer(chosen: LoadedModel, out: Send) -> None:
            await self._answer(chosen, scope, receive, out, body)

        content_type = _header(scope, b"content-type")
        shadow = None
        if content_type is not None and _media_type(content_type)[0] == "application/json":
            direct = self.settings.direct_path
            shadow = ShadowCopy(lambda challenger: scoring.score_json(challenger, body, direct), json_predictions)
        await self.rollout.serve(model, answer, send, shadow)

    async def _not_served_yet(self, send: Send, errors: ErrorReply) -> None:
        retry = str(max(1, round(self.settings.poll_seconds))).encode()
        await self._send(send, errors(503, f"No model is served yet: {self.watcher.waiting_for}"), None,
                         [(b"retry-after", retry)])

    async def _answer(self, model: LoadedModel, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Score the body with model (the production or the challenger version) and answer."""
        started = time.perf_counter()
        coding = _header(scope, b"content-encoding")
        if coding is not None and not _identity_only(coding):
            # Undecoded, a compressed body would be answered as if it were malformed JSON.
            return await self._send(
                send,
                error_reply(415, f"Content-Encoding {coding.decode('latin-1')!r} is not supported; "
                            "send the body uncompressed"),
                model,
                [(b"accept-encoding", b"identity")],
            )
        content_type = _header(scope, b"content-type")
        if content_type is None:
            return await self._send(
                send,
                error_reply(415, "Set a Content-Type header: application/json, text/csv or "
                            "application/vnd.apache.parquet"),
                model,
            )
        mime, params = _media_type(content_type)
        if mime == "application/json" and params.get("charset", "utf-8") == "utf-8" and (
            params.keys() <= {"charset"}
        ):
            direct = self.settings.direct_path
            if len(body) <= INLINE_MAX_BYTES:
                data = scoring.parse_json_body(model, body, direct)
                metrics.request_rows(data)
                if data is None or isinstance(data, Reply):
                    reply = data
                elif self._batcher is not None and model.batchable:
                    reply = await self._batcher.submit(model, data)
                else:
                    reply = scoring.predict_reply(model, data)
            else:
                data = body  # parsed again off the request path, if this request is logged
                loop = asyncio.get_running_loop()
                reply = await loop.run_in_executor(self._executor, scoring.score_json, model, body, direct,
                                                   metrics.request_rows)
            if reply is not None:
                self.prediction_log.record(model.ref.version, data, reply, time.perf_counter() - started)
                return await self._send(send, reply, model)
        await self._forward(model, scope, receive, send, body)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, model: LoadedModel | None,
                         errors: ErrorReply = error_reply) -> bytes | None:
        """The whole body, or None after answering 413/408/400 itself (written by `errors`).
        Never holds more than the limit in memory."""
        limit = self.settings.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await self._send(send, errors(400, "Content-Length is not a number"), model,
                                 [(b"connection", b"close")])
                return None
            if int(declared) > limit:
                # Decided from the header alone. A client that waits for 100-continue has
                # sent nothing; others are already sending, so let a bounded amount drain.
                if _header(scope, b"expect") != b"100-continue" and int(declared) <= DRAIN_BYTES:
                    await self._discard(receive, int(declared))
                await self._too_large(send, model, f"Content-Length {int(declared)}", errors)
                return None
        chunks = []
        size = 0
        more = True
        loop = asyncio.get_running_loop()
        try:
            # One timeout for the whole read, pushed back whenever part of the body arrives.
            async with asyncio.timeout(loop.time() + self.body_idle_seconds) as idle:
                while more and size <= limit:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone()
                    chunk = message.get("body", b"")
                    more = message.get("more_body", False)
                    size += len(chunk)
                    chunks.append(chunk)
                    idle.reschedule(loop.time() + self.body_idle_seconds)
        except TimeoutError:
            await self._send(
                send,
                errors(408, f"The request body stopped arriving: nothing for {self.body_idle_seconds:g} s "
                            f"after {size} bytes. Send the whole body (as long as Content-Length says) "
                            "without pausing."),
                model,
                [(b"connection", b"close")],
            )
            return None
        if size > limit:
            chunks.clear()
            if more:
                await self._discard(receive, DRAIN_BYTES - size)
            await self._too_large(send, model, f"more than {limit} bytes", errors)
            return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _discard(self, receive: Receive, budget: int) -> None:
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while budget > 0:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    budget -= len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            pass

    async def _too_large(self, send: Send, model: LoadedModel | None, what: str, errors: ErrorReply) -> None:
        limit = self.settings.max_body_bytes
        await self._send(
            send,
            errors(413, f"Request body too large ({what}); the limit is {limit} bytes "
                        "(SERVING_MAX_BODY_BYTES). Send fewer images per request."),
            model,
            [(b"connection", b"close")],
        )

    # -- the Open Inference Protocol (/v2) -----------------------------------------------------

    async def _open_inference(self, model: LoadedModel | None, scope: Scope, receive: Receive, send: Send) -> None:
        """The protocol's routes (serving/open_inference.py); every error is `{"error": ...}`."""
        parts = scope["path"].rstrip("/").split("/")[2:]
        method = scope["method"]
        wanted = "POST" if parts[-1:] == ["infer"] else "GET"
        if method != wanted and not (wanted == "GET" and method == "HEAD"):
            return await self._send(send, oip.error_reply(405, f"Use {wanted} for {scope['path']}"), model,
                                    [(b"allow", wanted.encode())])
        if parts in ([], ["health", "live"], ["health", "ready"]):
            if parts == ["health", "ready"] and model is None:
                return await self._not_served_yet(send, oip.error_reply)
            document = {"live": True} if parts == ["health", "live"] else {"ready": True}
            if not parts:
                from mlflow.version import VERSION

                document = oip.server_metadata(VERSION)
            return await self._send(send, Reply(200, json.dumps(document).encode()), model)
        route = oip.model_route(parts, self.settings.model_name)
        if isinstance(route, Reply):
            return await self._send(send, route, model)
        action, version = route
        chosen = self._served_version(model, version) if model is not None else None
        if action != "infer":
            if chosen is None:
                return await self._not_served(send, model, version)
            if action == "ready":
                return await self._send(send, Reply(200, b'{"ready": true}'), chosen)
            document = oip.model_metadata(chosen.ref.name, [chosen.ref.version], chosen.input_spec,
                                          chosen.pyfunc.metadata.get_output_schema())
            return await self._send(send, Reply(200, json.dumps(document).encode()), chosen)

        async def infer(receive: Receive, send: Send) -> None:
            # The body is read before any refusal, so that the connection stays usable.
            body = await self._read_body(scope, receive, send, chosen or model, oip.error_reply)
            if body is None:
                return
            if chosen is None:
                return await self._not_served(send, model, version)

            async def answer(scored: LoadedModel, out: Send) -> None:
                await self._infer(scored, scope, out, body)

            if version is not None:
                return await answer(chosen, send)  # the client chose the version: no canary draw
            header_length = _header(scope, oip.HEADER_LENGTH)
            shadow = ShadowCopy(lambda challenger: _score_infer(challenger, body, header_length)[0],
                                oip.answer_predictions)
            await self.rollout.serve(chosen, answer, send, shadow)

        await metrics.measure_invocation(infer, receive, send)

    async def _not_served(self, send: Send, model: LoadedModel | None, version: str | None) -> None:
        if model is None:
            return await self._not_served_yet(send, oip.error_reply)
        await self._send(send, oip.error_reply(404, f"Version {version} of {self.settings.model_name!r} is not "
                                               f"served here; version {model.ref.version} is"), model)

    def _served_version(self, production: LoadedModel, version: str | None) -> LoadedModel | None:
        """The model of `version` if this worker has it loaded (production or challenger)."""
        if version is None or version == production.ref.version:
            return production
        challenger = self.rollout.watcher.current
        return challenger if challenger is not None and challenger.ref.version == version else None

    async def _infer(self, model: LoadedModel, scope: Scope, send: Send, body: bytes) -> None:
        started = time.perf_counter()
        coding = _header(scope, b"content-encoding")
        if coding is not None and not _identity_only(coding):
            return await self._send(send, oip.error_reply(415, f"Content-Encoding {coding.decode('latin-1')!r} is "
                                                          "not supported; send the body uncompressed"),
                                    model, [(b"accept-encoding", b"identity")])
        header_length = _header(scope, oip.HEADER_LENGTH)
        if len(body) <= INLINE_MAX_BYTES:
            read = _read_infer(model, body, header_length)
            if isinstance(read, Reply):
                reply, data = read, None
            else:
                data, encode = read
                if self._batcher is not None and model.batchable:
                    reply = oip.from_scoring(await self._batcher.submit(model, data, encode))
                else:
                    reply = oip.from_scoring(scoring.predict_reply(model, data, encode))
        else:
            loop = asyncio.get_running_loop()
            reply, data = await loop.run_in_executor(self._executor, _score_infer, model, body, header_length)
        metrics.request_rows(data)
        self.prediction_log.record(model.ref.version, data, reply, time.perf_counter() - started)
        await self._send(send, reply, model)

    # -- MLflow's scoring app ---------------------------------------------------------------

    async def _forward(self, model: LoadedModel, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        """Let MLflow's scoring app answer, replaying the body already read; its errors
        are rewritten as bounded JSON and every answer carries the version headers."""
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # waits for a disconnect, like the server would

        error_start = None
        error_body = []
        responded = False

        async def capture(message: Message) -> None:
            nonlocal error_start, responded
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    error_start = message  # rewritten once the whole body is here
                    return
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + model.headers
                responded = True
                await send(message)
            elif error_start is None:
                await send(message)
            else:
                error_body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    content_type = dict(error_start.get("headers", [])).get(b"content-type", b"")
                    reply = scoring.normalise_error(
                        error_start["status"], content_type, b"".join(error_body)
                    )
                    responded = True
                    await self._send(send, reply, model)

        try:
            await model.scoring_app(scope, replay, capture)
        except Exception:
            log.warning("MLflow's scoring app failed on %s %s", scope["method"], scope["path"],
                        exc_info=True)
            if not responded:
                await self._send(send, error_reply(500, "Internal error while scoring"), model)

    # -- answers -----------------------------------------------------------------------------

    async def _send(self, send: Send, reply: Reply, model: LoadedModel | None, extra: Headers = ()) -> None:
        headers = [
            (b"content-type", reply.content_type),
            (b"content-length", str(len(reply.body)).encode()),
            *(model.headers if model is not None else self._name_header),
            *reply.headers,
            *extra,
        ]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})


def _read_infer(model: LoadedModel, body: bytes,
                header_length: bytes | None) -> Reply | tuple[np.ndarray, scoring.Encoder]:
    """An inference request's tensor and how to write its answer, or the 400 saying why not."""
    try:
        request = oip.read_request(model.input_spec, body, header_length)
    except oip.BadRequest as e:
        return oip.error_reply(400, str(e))
    return request.array, oip.encoder(model.ref.name, model.ref.version, request)


def _score_infer(model: LoadedModel, body: bytes, header_length: bytes | None) -> tuple[Reply, np.ndarray | None]:
    """Read and score a large inference request (on the scoring thread)."""
    read = _read_infer(model, body, header_length)
    if isinstance(read, Reply):
        return read, None
    return oip.from_scoring(scoring.predict_reply(model, *read)), read[0]


def create_app() -> ServingApp:
    """Factory named in gunicorn.conf.py: one app, hence one watcher, per worker process."""
    try:
        settings = config.from_env()
    except config.ConfigError as e:
        print(f"serving: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    app = ServingApp(settings)
    log.debug("worker %d created its app", os.getpid())
    return app
