"""The rules the trainer and serving share (stack_common)."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from stack_common.registry import alias_missing
from stack_common.text import clip, one_line
from stack_common.uris import redact


def test_a_long_message_keeps_its_start_and_end_and_says_what_was_left_out():
    text = "start " + "x" * 1000 + " the reason at the end"
    clipped = clip(text, 100)
    assert clipped.startswith("start ") and clipped.endswith(" the reason at the end")
    assert f"[{len(text) - 100} characters left out]" in clipped
    assert clip("short", 100) == "short"


def test_an_error_is_one_line_and_named_by_its_type_when_it_says_nothing():
    assert one_line(ValueError("first\n  second\tthird")) == "first second third"
    assert one_line(TimeoutError()) == "TimeoutError"
    assert "\n" not in one_line("x\n" * 1000, 50)


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://trainer:s3cret@mlflow:5000/", "http://mlflow:5000/"),
    ("https://user:p%40ss@host.example/path?q=1", "https://host.example/path?q=1"),
    ("http://mlflow:5000", "http://mlflow:5000"),
    ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
])
def test_a_uri_is_shown_without_its_password(uri, shown):
    assert redact(uri) == shown


@pytest.mark.parametrize(("code", "message", "missing"), [
    (RESOURCE_DOES_NOT_EXIST, "Registered Model with name=m not found", True),
    (INVALID_PARAMETER_VALUE, "Registered model alias production not found.", True),
    (INVALID_PARAMETER_VALUE, "Invalid alias name", False),
    (INTERNAL_ERROR, "connection to the database not found", False),
])
def test_only_the_registrys_own_answers_mean_an_alias_is_missing(code, message, missing):
    assert alias_missing(MlflowException(message, error_code=code)) is missing
