"""Malformed POST /invocations requests, shared by the serving unit tests (in-process) and
the integration tests (over a socket, against the running container).

Every case must get a 4xx with a JSON `{"error_code", "message"}` answer and leave the
server answering. A case says what is sent: the body, the headers exactly as sent
(Content-Length is added from the body unless the case sets it or Transfer-Encoding), and
whether the body goes in chunks (Transfer-Encoding: chunked) instead. `status` is the one
status a case must get where a specific one is owed (408, 413, 415); other cases accept
any 4xx.

Not in here, because MLflow's scoring protocol accepts it and so does serving: a `params`
object for a model that declares no parameters (MLflow ignores it). Values of the wrong JSON
type (booleans or strings as pixels, a `params` that is not an object) are refused with 400;
they are in tests/unit/serving/request_bodies.py.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass

JSON = "application/json"
IMAGE_SHAPE = (1, 1, 28, 28)
# The serving container's default SERVING_MAX_BODY_BYTES (8 MiB).
SERVING_LIMIT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Malformed:
    name: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("Content-Type", JSON),)
    status: int | None = None
    chunked: bool = False
    # The lie is in the HTTP framing, which only a real HTTP server acts on: an in-process
    # ASGI call delivers the whole body whatever Content-Length says.
    wire_only: bool = False
    # Framing the HTTP server's parser refuses before the app sees the request: in the stack
    # the gateway (nginx) answers those itself, 400 with a JSON reason and no model version.
    refused_by_http_parser: bool = False
    # The client sends less than it declared and then waits: answered when serving stops
    # waiting for the rest (serving.app.BODY_IDLE_SECONDS), so it is sent apart.
    stalls: bool = False
    path: str = "/invocations"

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def wire_bytes(self, host: str) -> bytes:
        """The request as an HTTP/1.1 client sends it, on a connection of its own."""
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in self.chunks()) + b"0\r\n\r\n"
        else:
            if self.header("Content-Length") is None and self.header("Transfer-Encoding") is None:
                lines.append(f"Content-Length: {len(self.body)}")
            body = self.body
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def chunks(self, size: int = 1 << 20) -> list[bytes]:
        return [self.body[i:i + size] for i in range(0, len(self.body), size)] or [b""]


def _json(document) -> bytes:
    return json.dumps(document).encode()


def image(value=0.5, shape=IMAGE_SHAPE):
    """A nested list of the given shape filled with `value` (no numpy: the integration
    tests run it too)."""
    if not shape:
        return value
    return [image(value, shape[1:]) for _ in range(shape[0])]


ONE_IMAGE = _json({"inputs": image()})
# A valid one-image body with its first pixel replaced by a raw JSON token.
def _first_pixel(token: bytes) -> bytes:
    return ONE_IMAGE.replace(b"0.5", token, 1)


def _typed(content_type: str) -> tuple[tuple[str, str], ...]:
    return (("Content-Type", content_type),)


def _cases() -> list[Malformed]:
    deep = 100_000
    cases = [
        # --- not JSON, or not whole -------------------------------------------------------
        Malformed("not JSON", b"{this is not json"),
        Malformed("empty body", b""),
        Malformed("truncated body", ONE_IMAGE[: len(ONE_IMAGE) // 2]),
        Malformed("truncated mid-number", b'{"inputs": [[[[0.5, 0.'),
        Malformed("trailing comma", b'{"inputs": [[[[0.5,]]]],}'),
        Malformed("single quotes", b"{'inputs': [[[[0.5]]]]}"),
        Malformed("garbage after the document", ONE_IMAGE + b" trailing"),
        Malformed("two documents", ONE_IMAGE + ONE_IMAGE),
        Malformed("invalid UTF-8", b'{"inputs": "\xff\xfe"}'),
        Malformed("NUL bytes", b"\x00" * 64),
        Malformed("absurdly deep nesting", b"[" * deep + b"]" * deep),
        Malformed("absurdly deep nesting inside inputs", b'{"inputs": ' + b"[" * deep + b"]" * deep + b"}"),
        Malformed("integer too long to parse", b'{"inputs": [[[[' + b"9" * 5000 + b"]]]]}"),
        # --- JSON, but not an object holding a tensor -------------------------------------
        Malformed("JSON list instead of object", b"[1, 2, 3]"),
        Malformed("JSON string", b'"hello"'),
        Malformed("JSON null", b"null"),
        Malformed("JSON number", b"42"),
        Malformed("empty object", b"{}"),
        Malformed("missing inputs key", _json({"data": image()})),
        Malformed("two input keys", _json({"inputs": image(), "instances": image()})),
        Malformed("inputs null", b'{"inputs": null}'),
        Malformed("inputs true", b'{"inputs": true}'),
        Malformed("inputs scalar", b'{"inputs": 3}'),
        Malformed("inputs string", b'{"inputs": "0.5"}'),
        Malformed("inputs object", b'{"inputs": {"a": 1}}'),
        Malformed("inputs as named tensors", _json({"inputs": {"image": image()}})),
        # --- a tensor of the wrong kind -----------------------------------------------------
        Malformed("zero images", b'{"inputs": []}'),
        Malformed("zero rows in one image", b'{"inputs": [[]]}'),
        Malformed("wrong shape (flat)", _json({"inputs": [[0.5] * 784]})),
        Malformed("wrong shape (no channel)", _json({"inputs": image(shape=(1, 28, 28))})),
        Malformed("wrong shape (27 rows)", _json({"inputs": image(shape=(1, 1, 27, 28))})),
        Malformed("wrong shape (3 channels)", _json({"inputs": image(shape=(1, 3, 28, 28))})),
        Malformed("ragged rows", _json({"inputs": [[[[0.5] * 28] * 27 + [[0.5] * 3]]]})),
        Malformed("nesting deeper than numpy allows", b'{"inputs": ' + b"[" * 100 + b"0.5" + b"]" * 100 + b"}"),
        Malformed("strings instead of numbers", _json({"inputs": image("a")})),
        Malformed("null pixels", _json({"inputs": image(None)})),
        Malformed("object pixels", _json({"inputs": image({"v": 0.5})})),
        Malformed("one null pixel", _first_pixel(b"null")),
        Malformed("NaN", _first_pixel(b"NaN")),
        Malformed("Infinity", _first_pixel(b"Infinity")),
        Malformed("-Infinity", _first_pixel(b"-Infinity")),
        Malformed("1e999", _first_pixel(b"1e999")),
        Malformed("overflowing float32", _json({"inputs": image(1e300)})),
        # --- MLflow's other request formats with the wrong contents -------------------------
        Malformed("instances null", b'{"instances": null}'),
        Malformed("instances empty", b'{"instances": []}'),
        Malformed("instances of records", _json({"instances": [{"a": 1}]})),
        Malformed("instances of strings", _json({"instances": ["a", "b"]})),
        Malformed("dataframe of the wrong columns", _json({"dataframe_split": {"columns": ["a"], "data": [[1]]}})),
        Malformed("dataframe_split not an object", b'{"dataframe_split": 5}'),
        Malformed("dataframe_split without data", _json({"dataframe_split": {"columns": 1}})),
        Malformed("dataframe_split data not a list", _json({"dataframe_split": {"columns": ["a"], "data": "x"}})),
        Malformed("dataframe_split empty", _json({"dataframe_split": {"columns": [], "data": []}})),
        Malformed("dataframe_records not a list", b'{"dataframe_records": "x"}'),
        Malformed("dataframe_records of strings", _json({"dataframe_records": ["a", "b"]})),
        Malformed("dataframe_records empty", b'{"dataframe_records": []}'),
        Malformed("only params", b'{"params": {}}'),
        Malformed("chat messages", b'{"messages": 1}'),
        Malformed("completion prompt", b'{"prompt": null}'),
        # --- content types and encodings ----------------------------------------------------
        Malformed("no Content-Type", ONE_IMAGE, headers=(), status=415),
        Malformed("empty Content-Type", ONE_IMAGE, headers=_typed(""), status=415),
        Malformed("Content-Type without a subtype", ONE_IMAGE, headers=_typed("json"), status=415),
        Malformed("unsupported content type", ONE_IMAGE, headers=_typed("text/plain"), status=415),
        Malformed("form-encoded", b"inputs=0.5", headers=_typed("application/x-www-form-urlencoded"), status=415),
        Malformed("multipart", b"--x\r\n\r\n0.5\r\n--x--\r\n", headers=_typed("multipart/form-data; boundary=x"),
                  status=415),
        Malformed("octet-stream", bytes(784), headers=_typed("application/octet-stream"), status=415),
        Malformed("unsupported charset", ONE_IMAGE, headers=_typed("application/json; charset=latin-1")),
        Malformed("unknown content-type parameter", ONE_IMAGE, headers=_typed("application/json; x=y")),
        Malformed("CSV that does not fit", b"a,b\n1,2\n", headers=_typed("text/csv")),
        Malformed("CSV that is not UTF-8", b"\xff\xfe\x00", headers=_typed("text/csv")),
        Malformed("CSV garbage", b'\x01"",,\n"\n;;\t\x7f', headers=_typed("text/csv")),
        Malformed("parquet that is not parquet", b"PAR1 nonsense", headers=_typed("application/vnd.apache.parquet")),
        Malformed("gzip body", gzip.compress(ONE_IMAGE),
                  headers=(("Content-Type", JSON), ("Content-Encoding", "gzip")), status=415),
        Malformed("deflate body", zlib.compress(ONE_IMAGE),
                  headers=(("Content-Type", JSON), ("Content-Encoding", "deflate")), status=415),
        Malformed("unknown content encoding", ONE_IMAGE,
                  headers=(("Content-Type", JSON), ("Content-Encoding", "br")), status=415),
        # --- size and framing --------------------------------------------------------------
        Malformed("body over the limit", b'{"inputs": [' + b"0.5," * (SERVING_LIMIT_BYTES // 4) + b"0.5]}",
                  status=413),
        Malformed("chunked body over the limit", b'{"inputs": [' + b"0.5," * (SERVING_LIMIT_BYTES // 4) + b"0.5]}",
                  status=413, chunked=True),
        Malformed("Content-Length shorter than the body", ONE_IMAGE,
                  headers=(("Content-Type", JSON), ("Content-Length", str(len(ONE_IMAGE) // 2))), wire_only=True),
        Malformed("Content-Length longer than the body", ONE_IMAGE,
                  headers=(("Content-Type", JSON), ("Content-Length", str(len(ONE_IMAGE) + 100))),
                  status=408, wire_only=True, stalls=True),
        *(
            Malformed(name, body, headers=(("Content-Type", JSON), *framing), wire_only=True,
                      refused_by_http_parser=True)
            for name, body, framing in (
                ("Content-Length not a number", ONE_IMAGE, (("Content-Length", "abc"),)),
                ("negative Content-Length", ONE_IMAGE, (("Content-Length", "-5"),)),
                ("two different Content-Lengths", ONE_IMAGE, (("Content-Length", "5"), ("Content-Length", "7"))),
                ("Content-Length beside chunked", b"5\r\nhello\r\n0\r\n\r\n",
                 (("Content-Length", "5"), ("Transfer-Encoding", "chunked"))),
                ("chunk size not hex", b"zz\r\nhello\r\n0\r\n\r\n", (("Transfer-Encoding", "chunked"),)),
                ("Transfer-Encoding gzip", ONE_IMAGE, (("Transfer-Encoding", "gzip"),)),
            )
        ),
        # A request line nginx cannot resolve (it once answered this one 500).
        Malformed("path above the root", ONE_IMAGE, path="/../../invocations", wire_only=True,
                  refused_by_http_parser=True),
    ]
    return cases


CASES = _cases()
BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "two malformed cases share a name"
