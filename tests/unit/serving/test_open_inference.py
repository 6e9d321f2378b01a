"""The Open Inference Protocol routes in-process, with requests built and answers read by
Triton's own HTTP client library: metadata, readiness, binary and JSON tensors, answers
equal to /invocations', and every malformed request answered 4xx with `{"error"}`."""

import asyncio
import json
import re

import numpy as np
import pytest
import tritonclient.http as triton
from serving_helpers import call, post_json, wait_until
from triton_requests import infer, result, triton_request

from serving.app import INLINE_MAX_BYTES

IMAGE = (1, 28, 28)


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, *IMAGE), dtype=np.float32)


def mlflow_predictions(app, array):
    answer = asyncio.run(post_json(app, json.dumps({"inputs": array.tolist()}).encode()))
    assert answer.status == 200, answer.body
    return np.asarray(answer.json()["predictions"], dtype=np.float32)


@pytest.mark.parametrize("rows", [1, 64], ids=["one-image", "64-images-scored-off-the-event-loop"])
@pytest.mark.parametrize(("binary_input", "binary_output"), [(True, True), (True, False), (False, True),
                                                             (False, False)])
def test_a_request_from_tritons_client_gets_the_same_predictions_as_invocations(served, rows, binary_input,
                                                                               binary_output):
    array = images(rows, seed=rows)
    body, headers = triton_request(array, binary_input, binary_output)
    if rows == 64:
        assert len(body) > INLINE_MAX_BYTES
    response = infer(served, body, headers)
    assert response.status == 200, response.body
    assert response.headers["x-model-version"] == "1"
    assert ("inference-header-content-length" in response.headers) == binary_output
    assert response.headers["content-type"] == ("application/octet-stream" if binary_output else "application/json")
    answer = result(response)
    predictions = answer.as_numpy("predictions")
    assert predictions.dtype == np.float32
    np.testing.assert_array_equal(predictions, mlflow_predictions(served, array))
    document = answer.get_response()
    assert document["model_name"] == served.settings.model_name
    assert document["model_version"] == "1"
    assert document["id"] == "req-7"


def test_nested_json_data_is_read_in_row_major_order(served):
    array = images(2, seed=3)
    body = json.dumps({"inputs": [{"name": "inputs", "shape": [2, *IMAGE], "datatype": "FP32",
                                   "data": array.tolist()}]}).encode()
    response = infer(served, body, {"content-type": "application/json"})
    assert response.status == 200, response.body
    np.testing.assert_array_equal(result(response).as_numpy("predictions"), mlflow_predictions(served, array))


def test_metadata_says_how_to_build_a_request(served):
    name = served.settings.model_name
    server = asyncio.run(call(served, "GET", "/v2")).json()
    assert "binary_tensor_data" in server["extensions"]
    model = asyncio.run(call(served, "GET", f"/v2/models/{name}")).json()
    assert model["name"] == name
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert model["outputs"] == [{"name": "predictions", "datatype": "FP32", "shape": [-1, 10]}]
    pinned = asyncio.run(call(served, "GET", f"/v2/models/{name}/versions/1")).json()
    assert pinned == model
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{name}/ready",
                 f"/v2/models/{name}/versions/1/ready"):
        assert asyncio.run(call(served, "GET", path)).status == 200, path


def test_a_version_in_the_path_is_answered_only_by_that_version(served):
    name = served.settings.model_name
    body, headers = triton_request(images(1))
    pinned = infer(served, body, headers, f"/v2/models/{name}/versions/1/infer")
    assert pinned.status == 200
    assert pinned.headers["x-model-version"] == "1"
    other = infer(served, body, headers, f"/v2/models/{name}/versions/7/infer")
    assert other.status == 404
    assert other.json() == {"error": f"Version 7 of {name!r} is not served here; version 1 is"}
    assert asyncio.run(call(served, "GET", f"/v2/models/{name}/versions/7/ready")).status == 404


def test_before_a_model_is_served_ready_and_infer_say_why(registry, make_app):
    name = registry.new_model("good-a")  # no alias yet
    app = make_app(name)
    wait_until(lambda: app.watcher.polls >= 1, what="first poll")
    assert asyncio.run(call(app, "GET", "/v2/health/live")).status == 200
    ready = asyncio.run(call(app, "GET", "/v2/health/ready"))
    assert ready.status == 503
    assert "no version holds the alias yet" in ready.json()["error"]
    body, headers = triton_request(images(1))
    waiting = infer(app, body, headers)
    assert waiting.status == 503
    assert "retry-after" in waiting.headers
    assert f"waiting for {name}@production" in waiting.json()["error"]


def _header(document, binary=b""):
    head = json.dumps(document).encode()
    return head + binary, {"Inference-Header-Content-Length": str(len(head))} if binary else {}


ONE = images(1)
RAW = ONE.tobytes()
GOOD_INPUT = {"name": "inputs", "shape": [1, *IMAGE], "datatype": "FP32"}
BINARY_INPUT = {**GOOD_INPUT, "parameters": {"binary_data_size": len(RAW)}}

# (case, body, headers, status, words the error must contain)
BAD = [
    ("not-json", b"{inputs", {}, 400, "not a valid inference request"),
    ("no-inputs", b"{}", {}, 400, "inputs: Field required"),
    ("empty-inputs", b'{"inputs": []}', {}, 400, "inputs: List should have at least 1 item"),
    ("negative-dimension", *_header({"inputs": [{**GOOD_INPUT, "shape": [-1, 1, 28, 28], "data": []}]}), 400,
     "inputs.0.shape.0"),
    ("wrong-input-name", *_header({"inputs": [{**BINARY_INPUT, "name": "input-0"}]}, RAW), 400,
     "one input named 'inputs'; the request has 'input-0'"),
    ("two-inputs", *_header({"inputs": [BINARY_INPUT, BINARY_INPUT]}, RAW + RAW), 400, "one input named"),
    ("wrong-datatype", *_header({"inputs": [{**BINARY_INPUT, "datatype": "FP64"}]}, RAW), 400,
     "datatype 'FP64'; the model takes FP32"),
    ("bytes-datatype", *_header({"inputs": [{**GOOD_INPUT, "datatype": "BYTES", "data": ["a"]}]}), 400,
     "the model takes FP32"),
    ("wrong-rank", *_header({"inputs": [{**BINARY_INPUT, "shape": [1, 784]}]}, RAW), 400,
     "shape [1, 784]; the model takes [-1, 1, 28, 28]"),
    ("wrong-image-size", *_header({"inputs": [{**GOOD_INPUT, "shape": [1, 1, 14, 56],
                                               "parameters": {"binary_data_size": len(RAW)}}]}, RAW), 400,
     "the model takes [-1, 1, 28, 28]"),
    ("size-not-shape", *_header({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": 8}}]}, RAW[:8]), 400,
     "binary_data_size is 8 but shape [1, 1, 28, 28] of FP32 takes 3136 bytes"),
    ("body-shorter-than-size", *_header({"inputs": [BINARY_INPUT]}, RAW[:-4]), 400,
     "3132 bytes after the header; binary_data_size says 3136"),
    ("bytes-left-over", *_header({"inputs": [BINARY_INPUT]}, RAW + b"\0\0\0\0"), 400,
     "3140 bytes after the header"),
    ("binary-without-size", *_header({"inputs": [{**GOOD_INPUT}]}, RAW), 400, "no binary_data_size parameter"),
    ("size-not-a-number", *_header({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": "3136"}}]}, RAW),
     400, "binary_data_size must be a number of bytes"),
    ("data-and-binary", *_header({"inputs": [{**BINARY_INPUT, "data": [0.0]}]}, RAW), 400, "send one of them"),
    ("header-length-beyond-body", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400,
     "Inference-Header-Content-Length is '999'"),
    ("header-length-not-a-number", b'{"inputs": []}', {"Inference-Header-Content-Length": "ten"}, 400,
     "Inference-Header-Content-Length is 'ten'"),
    ("header-length-cuts-the-json", _header({"inputs": [BINARY_INPUT]}, RAW)[0],
     {"Inference-Header-Content-Length": "20"}, 400, "not a valid inference request"),
    ("no-data", *_header({"inputs": [GOOD_INPUT]}), 400, "needs data"),
    ("too-few-values", *_header({"inputs": [{**GOOD_INPUT, "data": [0.5] * 783}]}), 400,
     "has 783 values; shape [1, 1, 28, 28] takes 784"),
    ("ragged-data", *_header({"inputs": [{**GOOD_INPUT, "data": [[0.5] * 392, 0.5]}]}), 400,
     "mixes arrays and values"),
    ("string-pixel", *_header({"inputs": [{**GOOD_INPUT, "data": ["0.5"] + [0.5] * 783}]}), 400,
     "data holds '0.5'; FP32 takes numbers"),
    ("boolean-pixel", *_header({"inputs": [{**GOOD_INPUT, "data": [True] + [0.5] * 783}]}), 400,
     "data holds True"),
    ("null-pixel", *_header({"inputs": [{**GOOD_INPUT, "data": [None] + [0.5] * 783}]}), 400, "data holds None"),
    ("number-beyond-fp32", *_header({"inputs": [{**GOOD_INPUT, "data": [1e300] + [0.5] * 783}]}), 400,
     "NaN or infinity"),
    ("non-finite-pixels", *_header({"inputs": [BINARY_INPUT]},
                                   np.full((1, *IMAGE), np.nan, np.float32).tobytes()), 400, "NaN or infinity"),
    ("unknown-output", *_header({"inputs": [BINARY_INPUT], "outputs": [{"name": "logits"}]}, RAW), 400,
     "one output, named 'predictions'; the request asks for 'logits'"),
    ("binary-flag-not-boolean", *_header({"inputs": [BINARY_INPUT], "parameters": {"binary_data_output": 1}}, RAW),
     400, "parameters.binary_data_output must be true or false"),
    ("gzip-body", _header({"inputs": [BINARY_INPUT]}, RAW)[0],
     {**_header({"inputs": [BINARY_INPUT]}, RAW)[1], "Content-Encoding": "gzip"}, 415, "not supported"),
]


@pytest.mark.parametrize(("case", "body", "headers", "status", "words"), BAD, ids=[c[0] for c in BAD])
def test_a_malformed_request_gets_a_4xx_that_says_what_is_wrong(served, case, body, headers, status, words):
    response = infer(served, body, headers)
    assert response.status == status, response.body
    error = response.json()["error"]
    assert words in error
    # Triton's client shows the message as the error of the call.
    with pytest.raises(triton.InferenceServerException, match=re.escape(words)):
        triton._utils._raise_if_error(_Read(response))
    # The server still answers.
    body, headers = triton_request(images(1))
    assert infer(served, body, headers).status == 200


class _Read:
    """A finished response as tritonclient's error check reads it."""

    def __init__(self, response):
        self.status_code = response.status
        self._body = response.body

    def read(self):
        return self._body


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v2/models/{name}/infer", 405),
    ("POST", "/v2/models/{name}", 405),
    ("GET", "/v2/models/someone-else", 404),
    ("GET", "/v2/models/{name}/versions", 404),
    ("GET", "/v2/models/{name}/stats", 404),
    ("GET", "/v2/repository/index", 404),
])
def test_unknown_routes_and_methods_get_a_4xx_in_the_protocols_shape(served, method, path, status):
    response = asyncio.run(call(served, method, path.format(name=served.settings.model_name)))
    assert response.status == status
    assert response.json()["error"]


def test_a_batch_over_the_body_limit_gets_413_in_the_protocols_shape(served):
    over = served.settings.max_body_bytes // (4 * 28 * 28) + 1  # one image more than the limit holds
    body, headers = triton_request(images(over))
    response = infer(served, body, headers)
    assert response.status == 413
    assert "SERVING_MAX_BODY_BYTES" in response.json()["error"]
    assert response.headers["connection"] == "close"
    with pytest.raises(triton.InferenceServerException, match="Send fewer images per request"):
        triton._utils._raise_if_error(_Read(response))
