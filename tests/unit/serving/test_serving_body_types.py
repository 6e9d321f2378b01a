"""Values of the wrong JSON type anywhere in a body get a 400 naming the value, whichever
path scores the body: never a prediction, never a 500."""

import asyncio

import pytest
from request_bodies import WRONG_TYPES
from serving_helpers import post_json, wait_until

from serving import config
from serving.app import ServingApp


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    name = registry.new_model("good-a")
    registry.point(name, 1)
    settings = config.Settings(tracking_uri=registry.tracking_uri, model_name=name,
                               public_key=registry.public_key, poll_seconds=0.2,
                               cache_dir=str(tmp_path_factory.mktemp("cache")))
    app = ServingApp(settings)
    app.start()
    wait_until(lambda: app.watcher.status()["version"] == "1", what="version 1 served")
    yield app
    app.stop()


@pytest.mark.parametrize("case", WRONG_TYPES, ids=lambda case: case.name)
def test_wrong_json_type_is_400_naming_the_value(served, case):
    r = asyncio.run(post_json(served, case.body, case.content_type))
    assert r.status == 400, (r.status, r.body[:300])
    message = r.json()["message"]
    assert case.where in message, message
    assert r.json()["error_code"] == "BAD_REQUEST"
