"""Scoring one /invocations body with one loaded model, and shaping error answers.

Every JSON body is parsed here first and refused (400) when a value has the wrong JSON
type. The common body, exactly `{"inputs": <tensor>}`, is then scored here directly:
converted to the signature's dtype, passed to the same pyfunc `predict` that MLflow's
scoring server calls, and answered in MLflow's `{"predictions": ...}` shape (the direct
path, SERVING_DIRECT_PATH). Every other body returns None and goes to MLflow's own
scoring app.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import orjson
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server

from serving import json_types
from serving.model_store import LoadedModel
from stack_common.text import clip

log = logging.getLogger("serving")

# Error messages from MLflow quote the whole input; answers and logs keep both ends.
MAX_MESSAGE_CHARS = 2000
_UNEXPECTED_LOG_INTERVAL = 10.0
_last_unexpected_log = 0.0

JSON_TYPE = b"application/json"
ERROR_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "TIMEOUT",
}


class Reply(NamedTuple):
    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()
    predictions: object = None  # what a 200 answer was written from (the prediction log keeps it)


# Writes a model's predictions as the answer's body: MLflow's JSON, or another protocol's.
Encoder = Callable[[object], Reply]


def error_reply(status: int, message: str, error_code: str | None = None) -> Reply:
    code = error_code or ERROR_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
    return Reply(status, json.dumps({"error_code": code, "message": clip(message, MAX_MESSAGE_CHARS)}).encode())


def _log_unexpected(what: str) -> None:
    # A client can send the same breaking input in a loop; one traceback per interval is
    # enough to diagnose it without flooding the log.
    global _last_unexpected_log
    now = time.monotonic()
    if now - _last_unexpected_log >= _UNEXPECTED_LOG_INTERVAL:
        _last_unexpected_log = now
        log.warning("%s (further ones muted for %.0fs)", what, _UNEXPECTED_LOG_INTERVAL, exc_info=True)


def predictions_body(predictions: object) -> bytes:
    if isinstance(predictions, np.ndarray):
        # What MLflow's NumpyEncoder writes for an array, without its per-item dispatch.
        return json.dumps({"predictions": predictions.tolist()}).encode()
    from io import StringIO

    out = StringIO()
    scoring_server.predictions_to_json(predictions, out)
    return out.getvalue().encode()


def mlflow_reply(predictions: object) -> Reply:
    """The answer MLflow's scoring server gives: `{"predictions": ...}`."""
    return Reply(200, predictions_body(predictions), predictions=predictions)


def predict_reply(model: LoadedModel, data: object, encode: Encoder = mlflow_reply) -> Reply:
    """Run the pyfunc on parsed input; errors become JSON answers as in MLflow's server."""
    try:
        predictions = model.pyfunc.predict(data)
    except MlflowException as e:
        # Schema enforcement and the model's own input checks (e.g. non-finite values)
        # raise INVALID_PARAMETER_VALUE, which MLflow maps to 400.
        return error_reply(e.get_http_status_code(), e.message, e.error_code)
    except Exception as e:
        _log_unexpected(f"model {model.ref.name} v{model.ref.version} raised in predict")
        # MLflow's scoring server answers 400 for any error inside predict; same here.
        return error_reply(
            400,
            "The model could not score this input; check that it matches the model's "
            f"signature. Error: {type(e).__name__}: {e}",
        )
    return encoded(model, predictions, encode)


def encoded(model: LoadedModel, predictions: object, encode: Encoder) -> Reply:
    try:
        return encode(predictions)
    except Exception:
        _log_unexpected(f"model {model.ref.name} v{model.ref.version} returned unserialisable output")
        return error_reply(500, "The model's output could not be written as an answer")


def load_json(body: bytes, exact_integers: bool = False) -> object:
    """The parsed body, with orjson, which parses numbers several times faster than the json
    module. What orjson refuses but the json module reads (NaN and Infinity, numbers beyond
    a double's range, lone surrogates, nesting deeper than 1024 levels) and what neither
    reads go to the json module, so those bodies keep their answers (NaN pixels get the
    model's own 400) and their error messages. orjson reads integers beyond 64 bits as
    floats: `exact_integers` (a signature of integers) takes the json module's instead."""
    if not exact_integers:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


def parse_json_body(model: LoadedModel, body: bytes, direct: bool = True) -> Reply | np.ndarray | None:
    """Check a JSON body before anything casts its values. A Reply (400) when it is not
    JSON or a value has the wrong JSON type; the `inputs` array in the signature's dtype
    when `direct` and the body is exactly `{"inputs": <tensor>}` for a numeric tensor
    signature; otherwise None, and MLflow's scoring app reads it."""
    spec = model.input_spec
    try:
        document = load_json(body, exact_integers=json_types.integer_tensor(spec))
    except (ValueError, RecursionError) as e:
        # ValueError covers malformed JSON, bad UTF-8 and integers too long to convert;
        # RecursionError absurdly deep nesting. MLflow's app would answer 500 for the last two.
        return error_reply(400, f"The body is not valid JSON: {type(e).__name__}: {e}")
    tensor_body = (
        direct and type(document) is dict and document.keys() == {"inputs"} and json_types.numeric_tensor(spec)
    )
    if tensor_body:
        array = json_types.plain_numbers(body, document["inputs"], len(spec.shape), spec.type)
        if array is not None:
            return array
    problem = json_types.wrong_type(document, spec)
    if problem:
        return error_reply(400, f"The body has a value of the wrong type: {problem}")
    if not tensor_body:
        return None
    try:
        return np.asarray(document["inputs"], dtype=spec.type)
    except (ValueError, TypeError, OverflowError):
        return None  # e.g. an integer beyond float range: MLflow's parser words the error


def score_json(model: LoadedModel, body: bytes, direct: bool = True,
               on_parsed: Callable[[object], None] | None = None) -> Reply | None:
    """Answer a JSON body, or None when MLflow's scoring app should read it. `on_parsed`
    sees what parse_json_body returned (the request metrics count its rows)."""
    data = parse_json_body(model, body, direct)
    if on_parsed is not None:
        on_parsed(data)
    if data is None or isinstance(data, Reply):
        return data
    return predict_reply(model, data)


def predict_batch(model: LoadedModel, arrays: list[np.ndarray], encoders: list[Encoder] | None = None) -> list[Reply]:
    """Answer several requests with one predict call on their rows stacked, as if each
    had been scored alone, each answer written by its request's encoder (MLflow's JSON by
    default). Any doubt (an error, output rows not matching input rows) falls back to
    scoring them one by one, so one bad request cannot fail the others."""
    encoders = encoders or [mlflow_reply] * len(arrays)
    if len(arrays) > 1 and model.batchable and all(a.ndim >= 2 and a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        try:
            predictions = model.pyfunc.predict(np.concatenate(arrays))
        except Exception:
            predictions = None
        counts = [len(a) for a in arrays]
        if isinstance(predictions, np.ndarray) and predictions.ndim >= 1 and len(predictions) == sum(counts):
            replies = []
            start = 0
            for n, encode in zip(counts, encoders, strict=True):
                replies.append(encoded(model, predictions[start : start + n], encode))
                start += n
            return replies
    return [predict_reply(model, a, encode) for a, encode in zip(arrays, encoders, strict=True)]


def example_request(model: LoadedModel) -> bytes | None:
    """A body the model must answer before it is served: its saved serving input example,
    else a zero tensor of the signature's shape (every -1 taken as 1)."""
    info = getattr(model.pyfunc.metadata, "saved_input_example_info", None) or {}
    relative = info.get("serving_input_path")
    if relative:
        import os

        path = os.path.join(model.path, relative)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
    spec = model.input_spec
    if spec is not None:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        return json.dumps({"inputs": np.zeros(shape, dtype=spec.type).tolist()}).encode()
    return None


def check_answers(model: LoadedModel) -> None:
    """Raise unless the model answers its example request with finite predictions."""
    body = example_request(model)
    if body is None:
        log.warning(
            "model %s v%s has neither an input example nor a tensor signature; "
            "it is checked by loading only",
            model.ref.name,
            model.ref.version,
        )
        return
    reply = score_json(model, body)
    if reply is None:
        result = scoring_server.invocations(
            body, "application/json", model.pyfunc, model.pyfunc.metadata.get_input_schema()
        )
        reply = Reply(result.status, result.response.encode())
    if reply.status != 200:
        raise RuntimeError(f"example request answered {reply.status}: {reply.body[:500].decode(errors='replace')}")
    predictions = json.loads(reply.body).get("predictions")
    try:
        values = np.asarray(predictions, dtype=np.float64)
    except (TypeError, ValueError):
        return  # not a numeric tensor (e.g. labels): answering is all we can check
    if not np.isfinite(values).all():
        raise RuntimeError("example request answered non-finite predictions")
    outputs = model.pyfunc.metadata.get_output_schema()
    if outputs is not None and outputs.is_tensor_spec() and len(outputs.inputs) == 1:
        expected = outputs.inputs[0].shape
        if values.ndim != len(expected) or any(
            e != -1 and e != got for e, got in zip(expected, values.shape, strict=True)
        ):
            raise RuntimeError(
                f"example request answered shape {list(values.shape)}, "
                f"signature says {list(expected)}"
            )


def rows_score_independently(model: LoadedModel) -> bool:
    """Whether stacking requests changes no one's answer, so that they may be batched:
    the example scored alone must come out the same when scored beside other rows.
    A model that normalises over the batch, or anything else that fails, says no."""
    body = example_request(model)
    data = parse_json_body(model, body) if body is not None else None
    if not isinstance(data, np.ndarray) or data.ndim < 2 or not np.issubdtype(data.dtype, np.floating):
        return False
    # Different rows in the same range as the example (shifted, wrapped into [0, 1)).
    other = np.mod(data + 0.25, 1.0).astype(data.dtype)
    try:
        alone = model.pyfunc.predict(data)
        other_alone = model.pyfunc.predict(other)
        together = model.pyfunc.predict(np.concatenate([data, other]))
    except Exception:
        return False
    if not all(isinstance(p, np.ndarray) for p in (alone, other_alone, together)):
        return False
    n = len(data)
    if together.shape != (2 * n, *alone.shape[1:]) or alone.shape != other_alone.shape:
        return False
    # Float kernels may round differently for another batch size; anything beyond that
    # means the rows influence each other.
    return bool(
        np.allclose(together[:n], alone, rtol=1e-4, atol=1e-6)
        and np.allclose(together[n:], other_alone, rtol=1e-4, atol=1e-6)
    )


def normalise_error(status: int, content_type: bytes, body: bytes) -> Reply:
    """MLflow's app answers some errors as text/plain and quotes whole inputs; clients get
    `{"error_code", "message"}` JSON with a bounded message instead."""
    code = None
    message = body.decode("utf-8", errors="replace").strip()
    if content_type.startswith(JSON_TYPE):
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if isinstance(document, dict):
            code = document.get("error_code")
            message = str(document.get("message") or document.get("detail") or message)
    return error_reply(status, message or f"HTTP {status}", code)
