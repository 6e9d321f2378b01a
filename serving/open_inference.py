"""The Open Inference Protocol (KServe's V2 REST API, as Triton and MLServer speak it) for
the served model, with its binary tensor data extension.

    GET  /v2                                       server metadata
    GET  /v2/health/live, /v2/health/ready         liveness; readiness (a version is served)
    GET  /v2/models/NAME[/versions/V]              model metadata from the signature
    GET  /v2/models/NAME[/versions/V]/ready        200 while that model (version) is served
    POST /v2/models/NAME[/versions/V]/infer        scored like /invocations

The model's one unnamed tensor input is named `inputs` and its output `predictions`, the
keys MLflow's own JSON uses. A tensor comes either as JSON `data` or, with the extension, as
raw little-endian bytes after the JSON header (`Inference-Header-Content-Length` says where
the header ends): a 256-image batch is then read with one copy instead of parsing 200,000
numbers. Errors are `{"error": "<message>"}`, as the protocol's clients expect.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import chain
from typing import Annotated, Any, NamedTuple

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.scoring import Reply

INPUT_NAME = "inputs"
OUTPUT_NAME = "predictions"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = b"inference-header-content-length"
BINARY_TYPE = b"application/octet-stream"

# The protocol's tensor data types and the numpy type of each (little-endian when binary).
DATATYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
# The JSON values a tensor's `data` may hold for each kind of datatype (bool is not a number).
_JSON_TYPES = {"b": frozenset({bool}), "i": frozenset({int}), "u": frozenset({int}),
               "f": frozenset({int, float})}

NonNegative = Annotated[int, Field(ge=0)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields of later protocol versions


class RequestInput(_Message):
    name: str
    shape: list[NonNegative]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(_Message):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(_Message):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class Infer(NamedTuple):
    """A request read: the input tensor, the id to echo, whether the answer goes binary."""

    array: np.ndarray
    id: str | None
    binary_output: bool


class BadRequest(ValueError):
    pass


def error_reply(status: int, message: str) -> Reply:
    """An error as the protocol writes it: `{"error": message}`, with no MLflow error code."""
    return Reply(status, orjson.dumps({"error": message}))


def from_scoring(reply: Reply) -> Reply:
    """A scoring answer as this protocol writes it: errors come from scoring as MLflow's
    `{"error_code", "message"}` and leave as `{"error"}`, with the same status."""
    if reply.status == 200:
        return reply
    try:
        message = orjson.loads(reply.body).get("message") or reply.body.decode("utf-8", "replace")
    except (orjson.JSONDecodeError, AttributeError):
        message = reply.body.decode("utf-8", "replace")
    return error_reply(reply.status, str(message))


def model_route(parts: list[str], served_name: str) -> Reply | tuple[str, str | None]:
    """(action, version) for the path after /v2 (["models", NAME, ...]): action is
    "metadata", "ready" or "infer", version None for "whichever is served"."""
    if len(parts) < 2 or parts[0] != "models":
        return error_reply(404, f"No route /v2/{'/'.join(parts)}")
    name, rest, version = parts[1], parts[2:], None
    if name != served_name:
        return error_reply(404, f"No model named {name!r} here; this server serves {served_name!r}")
    if rest[:1] == ["versions"] and len(rest) >= 2:
        version, rest = rest[1], rest[2:]
    if rest == []:
        return "metadata", version
    if rest in (["ready"], ["infer"]):
        return rest[0], version
    return error_reply(404, f"No route /v2/{'/'.join(parts)}")


def datatype_of(dtype: np.dtype) -> str | None:
    return _NAMES.get(np.dtype(dtype).newbyteorder("="))


def _tensor_metadata(spec: Any, name: str) -> dict[str, Any] | None:
    datatype = datatype_of(spec.type) if isinstance(getattr(spec, "type", None), np.dtype) else None
    if datatype is None:
        return None
    return {"name": name, "datatype": datatype, "shape": list(spec.shape)}


def server_metadata(mlflow_version: str) -> dict[str, Any]:
    return {"name": "mlflow-stack-serving", "version": mlflow_version, "extensions": EXTENSIONS}


def model_metadata(name: str, versions: list[str], input_spec: Any, output_schema: Any) -> dict[str, Any]:
    """What a client needs to build a request: names, datatypes and shapes (-1: any size)."""
    document: dict[str, Any] = {"name": name, "versions": versions, "platform": "mlflow_pyfunc", "inputs": [],
                                "outputs": []}
    described = _tensor_metadata(input_spec, INPUT_NAME) if input_spec is not None else None
    if described:
        document["inputs"].append(described)
    if output_schema is not None and output_schema.is_tensor_spec() and len(output_schema.inputs) == 1:
        described = _tensor_metadata(output_schema.inputs[0], OUTPUT_NAME)
        if described:
            document["outputs"].append(described)
    return document


def read_request(input_spec: Any, body: bytes, header_length: bytes | None) -> Infer:
    """The request's input tensor in the signature's dtype and shape; BadRequest says what
    is wrong with it, naming the field."""
    if input_spec is None or datatype_of(input_spec.type) is None:
        raise BadRequest("This model has no single numeric tensor input; send its requests to /invocations")
    header, binary = _split(body, header_length)
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise BadRequest(f"The request header is not a valid inference request: {where}: {first['msg']}") from None
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        names = ", ".join(repr(i.name) for i in request.inputs)
        raise BadRequest(f"This model takes one input named {INPUT_NAME!r}; the request has {names}")
    binary_output = _binary_output(request)
    array = _input_array(request.inputs[0], input_spec, binary)
    return Infer(array, request.id, binary_output)


def _split(body: bytes, header_length: bytes | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    value = header_length.strip()
    if not value.isdigit() or not 0 < int(value) <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length is {value.decode('latin-1')!r}; it must be the size "
                         f"in bytes of the JSON header at the start of the body (1 to {len(body)})")
    view = memoryview(body)
    return bytes(view[: int(value)]), view[int(value):]


def _binary_output(request: InferenceRequest) -> bool:
    default = _flag(request.parameters, "binary_data_output", "parameters")
    if request.outputs is None:
        return default
    if len(request.outputs) != 1 or request.outputs[0].name != OUTPUT_NAME:
        names = ", ".join(repr(o.name) for o in request.outputs)
        raise BadRequest(f"This model has one output, named {OUTPUT_NAME!r}; the request asks for {names}")
    chosen = _flag(request.outputs[0].parameters, "binary_data", "outputs[0].parameters", None)
    return default if chosen is None else chosen


def _flag(parameters: dict[str, Any], key: str, where: str, default: bool | None = False) -> bool | None:
    value = parameters.get(key, default)
    if value is not default and type(value) is not bool:
        raise BadRequest(f"{where}.{key} must be true or false, not {value!r}")
    return value


def _input_array(given: RequestInput, spec: Any, binary: memoryview) -> np.ndarray:
    expected_type = datatype_of(spec.type)
    if given.datatype != expected_type:
        raise BadRequest(f"Input {INPUT_NAME!r} has datatype {given.datatype!r}; the model takes {expected_type}")
    shape = tuple(given.shape)
    expected_shape = tuple(spec.shape)
    if len(shape) != len(expected_shape) or any(e not in (-1, s) for e, s in zip(expected_shape, shape, strict=True)):
        raise BadRequest(f"Input {INPUT_NAME!r} has shape {list(shape)}; the model takes {list(expected_shape)} "
                         "(-1: any size)")
    count = math.prod(shape)
    dtype = spec.type
    size = given.parameters.get("binary_data_size")
    if size is not None:
        return _binary_array(size, binary, dtype, shape, count, given.data)
    if len(binary):
        raise BadRequest(f"The body has {len(binary)} bytes after the header but input {INPUT_NAME!r} has no "
                         "binary_data_size parameter")
    return _json_array(given.data, dtype, shape, count)


def _binary_array(size: object, binary: memoryview, dtype: np.dtype, shape: tuple[int, ...], count: int,
                  data: object) -> np.ndarray:
    if type(size) is not int or size < 0:
        raise BadRequest(f"binary_data_size must be a number of bytes, not {size!r}")
    if data is not None:
        raise BadRequest(f"Input {INPUT_NAME!r} has both data and binary_data_size; send one of them")
    expected = count * dtype.itemsize
    if size != expected:
        raise BadRequest(f"binary_data_size is {size} but shape {list(shape)} of {datatype_of(dtype)} takes "
                         f"{expected} bytes")
    if len(binary) != size:
        raise BadRequest(f"The body has {len(binary)} bytes after the header; binary_data_size says {size}")
    # Copied: the model may write into its input, and the body's bytes are read-only.
    return np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count).astype(dtype).reshape(shape)


def _json_array(data: object, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
    if type(data) is not list:
        raise BadRequest(f"Input {INPUT_NAME!r} needs data (an array, flat or nested, in row-major order) "
                         "or a binary_data_size parameter")
    flat = data
    while any(type(item) is list for item in flat):
        if not all(type(item) is list for item in flat):
            raise BadRequest(f"Input {INPUT_NAME!r} data mixes arrays and values at one level")
        flat = list(chain.from_iterable(flat))
    if len(flat) != count:
        raise BadRequest(f"Input {INPUT_NAME!r} has {len(flat)} values; shape {list(shape)} takes {count}")
    allowed = _JSON_TYPES[dtype.kind]
    if not set(map(type, flat)) <= allowed:
        wrong = next(value for value in flat if type(value) not in allowed)
        raise BadRequest(f"Input {INPUT_NAME!r} data holds {wrong!r}; {datatype_of(dtype)} takes "
                         f"{'true or false' if dtype.kind == 'b' else 'numbers'}")
    try:
        return np.fromiter(flat, dtype=dtype, count=count).reshape(shape)
    except (OverflowError, ValueError) as e:
        raise BadRequest(f"Input {INPUT_NAME!r} data does not fit {datatype_of(dtype)}: {e}") from None


def answer_predictions(body: bytes, headers: dict[bytes, bytes]) -> np.ndarray | None:
    """The `predictions` tensor of an answer `encoder` wrote, JSON or binary; None for
    anything else (an error, another shape of document)."""
    try:
        header, binary = _split(body, headers.get(HEADER_LENGTH))
        output = orjson.loads(header)["outputs"][0]
        dtype, shape = DATATYPES[output["datatype"]], tuple(output["shape"])
        if "data" in output:
            return np.asarray(output["data"], dtype=dtype).reshape(shape)
        return np.frombuffer(binary, dtype=dtype.newbyteorder("<")).reshape(shape)
    except (BadRequest, orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return None


def encoder(name: str, version: str, request: Infer) -> Callable[[object], Reply]:
    """How the model's predictions for `request` are written: JSON `data`, or raw bytes
    after the JSON header when the client asked for binary output."""

    def encode(predictions: object) -> Reply:
        array = np.asarray(predictions)
        datatype = datatype_of(array.dtype)
        if datatype is None:
            raise TypeError(f"predictions of dtype {array.dtype} have no Open Inference Protocol datatype")
        output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": datatype, "shape": list(array.shape)}
        document: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": [output]}
        if request.id is not None:
            document["id"] = request.id
        if not request.binary_output:
            output["data"] = array.ravel().tolist()
            return Reply(200, orjson.dumps(document), predictions=array)
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
        header = orjson.dumps(document)
        return Reply(200, header + raw, content_type=BINARY_TYPE,
                     headers=((HEADER_LENGTH, str(len(header)).encode()),), predictions=array)

    return encode
