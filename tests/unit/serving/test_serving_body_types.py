"""Values of the wrong JSON type anywhere in a body get a 400 naming the value, whichever
path scores the body: never a prediction, never a 500."""

import asyncio

import pytest
from request_bodies import WRONG_TYPES
from serving_helpers import post_json


@pytest.mark.parametrize("case", WRONG_TYPES, ids=lambda case: case.name)
def test_wrong_json_type_is_400_naming_the_value(served, case):
    r = asyncio.run(post_json(served, case.body, case.content_type))
    assert r.status == 400, (r.status, r.body[:300])
    message = r.json()["message"]
    assert case.where in message, message
    assert r.json()["error_code"] == "BAD_REQUEST"
