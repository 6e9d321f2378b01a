"""The JSON types the values of an /invocations body must have for the model's signature.

MLflow's scoring server (and numpy under it) casts whatever it can: `true` becomes 1.0 and
`"0.5"` becomes 0.5, so a client's mistake comes back as a confident prediction. Here a
value of the wrong JSON type is named by its path (`inputs[0][0][3][1]`) so that the body is
answered 400 before any parser casts it.
"""

from __future__ import annotations

import math
from itertools import chain

import numpy as np

_NUMBER_TYPES = frozenset({int, float})  # exact types: bool is a subclass of int
_NUMERIC_KINDS = "iuf"


def numeric_tensor(spec: object | None) -> bool:
    """Whether the signature's one tensor input holds numbers (the case checked here)."""
    dtype = getattr(spec, "type", None)
    return isinstance(dtype, np.dtype) and dtype.kind in _NUMERIC_KINDS


def integer_tensor(spec: object | None) -> bool:
    """Whether the signature's one tensor input holds integers."""
    dtype = getattr(spec, "type", None)
    return isinstance(dtype, np.dtype) and dtype.kind in "iu"


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"a string ({value[:20]!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a number"


# What the text of exactly `{"inputs": <numbers in nested arrays>}` holds: once these are
# deleted, only the key and its punctuation are left.
_NUMBERS_TEXT = b"0123456789.,-+eE[] \t\n\r"
_TENSOR_BODY_REST = b'{"inputs":}'


def plain_numbers(body: bytes, tensor: object, rank: int, dtype: np.dtype) -> np.ndarray | None:
    """The tensor of a body that is exactly `{"inputs": <tensor>}`, as an array of `dtype`,
    when the body's text shows it can hold nothing but numbers; None when in doubt.

    numpy would cast booleans, numeric strings and null, so a body whose text holds anything
    but numbers, brackets, commas, whitespace and the one key is left to the full walk.
    The nested lists are checked level by level (every list at a level as long as the
    others), then their numbers converted in one pass straight to `dtype`: np.fromiter on
    the leaves costs less than np.asarray finding the shape of nested lists, and a separate
    cast would release the GIL, which let a version switch land in the middle of one batch."""
    if body.translate(None, _NUMBERS_TEXT) != _TENSOR_BODY_REST:
        return None
    shape, level = [], [tensor]
    try:
        for depth in range(rank):
            lengths = set(map(len, level))  # TypeError: a number where an array belongs
            if len(lengths) != 1:
                return None  # ragged, or an empty array above the last level
            shape.append(lengths.pop())
            if depth < rank - 1:
                level = list(chain.from_iterable(level))
        leaves = chain.from_iterable(level) if rank else level
        # ValueError: an array where a number belongs; OverflowError: an integer beyond dtype.
        return np.fromiter(leaves, dtype=dtype, count=math.prod(shape)).reshape(shape)
    except (ValueError, TypeError, OverflowError):
        return None


def _first_sizes(value: list) -> list[int]:
    """The lengths met going down value[0][0]...: what every other array must match."""
    sizes, probe = [], value
    while type(probe) is list:
        sizes.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    return sizes


def _array_problem(node: list, where: str, root: str, sizes: list[int], depth: int, rank: int) -> str | None:
    """The first value in `node` (at `depth` in a nested array) that keeps the array from
    being a rectangular array of numbers of `rank` dimensions; `sizes` are the lengths of
    the first array at each depth."""
    if depth == rank - 1:
        if set(map(type, node)) <= _NUMBER_TYPES:
            return None
        for i, value in enumerate(node):
            if type(value) not in _NUMBER_TYPES:
                return f"{where}[{i}] is {_kind(value)}; expected a number"
    for i, child in enumerate(node):
        if type(child) is not list:
            return f"{where}[{i}] is {_kind(child)}; expected an array"
        expected = sizes[depth + 1] if depth + 1 < len(sizes) else len(child)
        if len(child) != expected:
            first = root + "[0]" * (depth + 1)
            return (f"{where}[{i}] has {len(child)} items where {first} has {expected} "
                    "(arrays must not be ragged)")
        problem = _array_problem(child, f"{where}[{i}]", root, sizes, depth + 1, rank)
        if problem:
            return problem
    return None


def _nested_problem(value: list, where: str, rank: int) -> str | None:
    try:
        return _array_problem(value, where, where, _first_sizes(value)[:rank], 0, rank)
    except RecursionError:
        return f"{where} is nested too deeply"


def tensor_problem(value: object, where: str, shape: tuple[int, ...]) -> str | None:
    """Why `value` is not a tensor of numbers of the signature's rank, naming the value."""
    rank = len(shape)
    if rank == 0:
        return None if type(value) in _NUMBER_TYPES else f"{where} is {_kind(value)}; expected a number"
    if type(value) is not list:
        return f"{where} is {_kind(value)}; the model takes an array of numbers of shape {list(shape)}"
    sizes = _first_sizes(value)
    if len(sizes) < rank and (not sizes[-1] or _leaf(value, len(sizes)) in _NUMBER_TYPES):
        return f"{where} has {len(sizes)} dimensions; the model takes {rank}, shape {list(shape)}"
    return _nested_problem(value, where, rank)


def _leaf(value: list, depth: int) -> type:
    for _ in range(depth):
        value = value[0]
    return type(value)


def _cell_problem(value: object, where: str) -> str | None:
    """A DataFrame cell for a tensor signature: a number, or an array of numbers."""
    if type(value) in _NUMBER_TYPES:
        return None
    if type(value) is list:
        return _nested_problem(value, where, max(len(_first_sizes(value)), 1))
    return f"{where} is {_kind(value)}; expected a number"


def wrong_type(document: object, spec: object | None) -> str | None:
    """A message naming the first value of the body with the wrong JSON type, or None.

    `params` must be an object whatever the model; the tensor formats are checked when the
    signature is one numeric tensor (`spec`), the only kind of model this server is built
    for. Bodies that are not objects, or hold no input at all, are left to the parser."""
    if type(document) is not dict:
        return None
    if "params" in document and type(document["params"]) is not dict:
        return f"params is {_kind(document['params'])}; expected an object of parameter names and values"
    if not numeric_tensor(spec):
        return None
    for key in ("inputs", "instances"):
        if key in document:
            problem = tensor_problem(document[key], key, tuple(spec.shape))
            if problem:
                return problem
    split = document.get("dataframe_split")
    if type(split) is dict and type(split.get("data")) is list:
        for i, row in enumerate(split["data"]):
            if type(row) is not list:
                return f"dataframe_split.data[{i}] is {_kind(row)}; expected an array (a row)"
            for j, cell in enumerate(row):
                problem = _cell_problem(cell, f"dataframe_split.data[{i}][{j}]")
                if problem:
                    return problem
    records = document.get("dataframe_records")
    if type(records) is list:
        for i, record in enumerate(records):
            if type(record) is not dict:
                return f"dataframe_records[{i}] is {_kind(record)}; expected an object (a row)"
            for column, cell in record.items():
                problem = _cell_problem(cell, f"dataframe_records[{i}].{column}")
                if problem:
                    return problem
    return None
