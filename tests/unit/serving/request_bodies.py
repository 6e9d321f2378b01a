"""Request bodies for the stand-in model (float32 [-1, 1, 28, 28]): valid ones in every
format MLflow's scoring server reads, and JSON bodies whose values have the wrong JSON type.

A wrong-type case names the value a user must fix (`where`, e.g. "inputs[0][0][3][1]");
its answer must be a 400 whose message names it, never a prediction.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np

JSON = "application/json"
CSV = "text/csv"
IMAGE = np.random.default_rng(7).random((2, 1, 28, 28), dtype=np.float32)
PIXELS = IMAGE.tolist()
COLUMNS = [f"p{i}" for i in range(28 * 28)]


@dataclass(frozen=True)
class Body:
    name: str
    body: bytes
    content_type: str = JSON
    where: str = ""  # the wrong value, for wrong-type cases


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def _with(value: object, at: tuple[int, ...] = (0, 0, 3, 1), pixels: list | None = None) -> list:
    """The images with one element (pixel or row) replaced."""
    images = copy.deepcopy(PIXELS if pixels is None else pixels)
    target = images
    for i in at[:-1]:
        target = target[i]
    target[at[-1]] = value
    return images


def _csv(rows: list[list[object]]) -> bytes:
    return ("\n".join([",".join(COLUMNS), *(",".join(map(str, r)) for r in rows)]) + "\n").encode()


FLAT = IMAGE.reshape(2, -1).tolist()

VALID = [
    Body("inputs", _json({"inputs": PIXELS})),
    Body("inputs with params", _json({"inputs": PIXELS, "params": {}})),
    Body("inputs with labels", _json({"inputs": PIXELS, "labels": [3, 1]})),
    Body("inputs of integers", _json({"inputs": np.ones((1, 1, 28, 28), dtype=int).tolist()})),
    # orjson, which parses bodies first, reads these differently from the json module
    # MLflow's app uses (integers beyond 64 bits as floats) or not at all (lone surrogates):
    # the answers must not differ.
    Body("inputs with an integer beyond 64 bits", _json({"inputs": _with(2**64 + 1)})),
    Body("inputs given twice (the last counts)",
         b'{"inputs": ' + _json(PIXELS[:1]) + b', "inputs": ' + _json(PIXELS) + b"}"),
    Body("inputs with a lone surrogate in labels", _json({"inputs": PIXELS, "labels": "\ud800"})),
    Body("inputs pretty-printed", json.dumps({"inputs": PIXELS}, indent=1).encode()),
    Body("instances", _json({"instances": PIXELS})),
    Body("instances with params", _json({"instances": PIXELS, "params": {}})),
    # MLflow reads these formats as a DataFrame, which its schema enforcement refuses for
    # a 4-d tensor signature: both servers must answer them alike, whatever that is.
    Body("dataframe_split", _json({"dataframe_split": {"columns": COLUMNS, "data": FLAT}})),
    Body("dataframe_split with params",
         _json({"dataframe_split": {"columns": COLUMNS, "data": FLAT}, "params": {}})),
    Body("dataframe_records", _json({"dataframe_records": [dict(zip(COLUMNS, row, strict=True)) for row in FLAT]})),
    Body("dataframe_records with params",
         _json({"dataframe_records": [dict(zip(COLUMNS, row, strict=True)) for row in FLAT], "params": {}})),
    Body("dataframe_split of images",
         _json({"dataframe_split": {"columns": ["image"], "data": [[p] for p in PIXELS]}})),
    # CSV carries no params in MLflow's protocol.
    Body("CSV", _csv(FLAT), CSV),
]

WRONG_TYPES = [
    Body("true pixel", _json({"inputs": _with(True)}), where="inputs[0][0][3][1]"),
    Body("false pixel", _json({"inputs": _with(False, (1, 0, 27, 27))}), where="inputs[1][0][27][27]"),
    Body("numeric string pixel", _json({"inputs": _with("0.5")}), where="inputs[0][0][3][1]"),
    Body("word pixel", _json({"inputs": _with("white")}), where="inputs[0][0][3][1]"),
    Body("null pixel", _json({"inputs": _with(None)}), where="inputs[0][0][3][1]"),
    Body("object pixel", _json({"inputs": _with({"v": 0.5})}), where="inputs[0][0][3][1]"),
    Body("array pixel", _json({"inputs": _with([0.5])}), where="inputs[0][0][3][1]"),
    Body("all pixels booleans", _json({"inputs": np.ones((1, 1, 28, 28), dtype=bool).tolist()}),
         where="inputs[0][0][0][0]"),
    Body("short row", _json({"inputs": _with([0.5] * 27, (0, 0, 5))}), where="inputs[0][0][5]"),
    Body("number for a row", _json({"inputs": _with(0.5, (0, 0, 5))}), where="inputs[0][0][5]"),
    Body("missing image plane", _json({"inputs": _with([], (1, 0))}), where="inputs[1][0]"),
    Body("inputs object", _json({"inputs": {"image": PIXELS}}), where="inputs"),
    Body("inputs string", _json({"inputs": "0.5"}), where="inputs"),
    Body("inputs boolean", _json({"inputs": True}), where="inputs"),
    Body("params array", _json({"inputs": PIXELS, "params": []}), where="params"),
    Body("params string", _json({"inputs": PIXELS, "params": "fast"}), where="params"),
    Body("params number", _json({"inputs": PIXELS, "params": 1}), where="params"),
    Body("params null", _json({"inputs": PIXELS, "params": None}), where="params"),
    Body("instances true pixel", _json({"instances": _with(True)}), where="instances[0][0][3][1]"),
    Body("instances string pixel", _json({"instances": _with("0.5")}), where="instances[0][0][3][1]"),
    Body("instances ragged", _json({"instances": _with([0.5] * 3, (0, 0, 0))}), where="instances[0][0][0]"),
    Body("instances with params array", _json({"instances": PIXELS, "params": ["x"]}), where="params"),
    Body("dataframe_split string cell",
         _json({"dataframe_split": {"columns": COLUMNS, "data": _with("0.5", (0, 3), FLAT)}}),
         where="dataframe_split.data[0][3]"),
    Body("dataframe_split boolean cell",
         _json({"dataframe_split": {"columns": COLUMNS, "data": _with(True, (1, 0), FLAT)}}),
         where="dataframe_split.data[1][0]"),
    Body("dataframe_records boolean value",
         _json({"dataframe_records": [{**dict(zip(COLUMNS, FLAT[0], strict=True)), "p7": True}]}),
         where="dataframe_records[0].p7"),
    Body("dataframe_records null value",
         _json({"dataframe_records": [{**dict(zip(COLUMNS, FLAT[0], strict=True)), "p7": None}]}),
         where="dataframe_records[0].p7"),
]
