"""Serving answers every body as MLflow's own scoring app does (same predictions, byte
for byte, and the same status class), whether the direct path scores it or MLflow's app
behind it does; the only difference is on purpose: values of the wrong JSON type get 400
where MLflow casts them into a prediction."""

import asyncio

import malformed_requests
import pytest
from request_bodies import VALID, WRONG_TYPES
from serving_helpers import Response, call, post_json, wait_until

from serving import config
from serving.app import ServingApp

# The requests that only our transport refuses (body limit, encodings, content types) are
# not about parsing a body; MLflow's app has none of those limits to compare with.
PARSED_CASES = [c for c in malformed_requests.CASES if not c.wire_only and c.status is None]

# Bodies MLflow's own app answers with a prediction although a value has the wrong JSON
# type: it casts booleans and numeric strings, and ignores a params that is not an object.
# Serving answers them 400. If MLflow changes this, the list here must follow.
MLFLOW_PREDICTS = {
    "true pixel", "false pixel", "numeric string pixel", "all pixels booleans",
    "params array", "params string", "params number", "params null",
    "instances true pixel", "instances string pixel", "instances with params array",
}


@pytest.fixture(scope="module")
def apps(registry, tmp_path_factory):
    """The same version served with the direct path on and off."""
    name = registry.new_model("good-a")
    registry.point(name, 1)
    settings = config.Settings(tracking_uri=registry.tracking_uri, model_name=name,
                               public_key=registry.public_key, poll_seconds=0.2,
                               cache_dir=str(tmp_path_factory.mktemp("cache")))
    started = []
    for direct in (True, False):
        app = ServingApp(settings.model_copy(update={"direct_path": direct}))
        app.start()
        started.append(app)
    for app in started:
        wait_until(lambda app=app: app.watcher.status()["version"] == "1", what="version 1 served")
    yield started
    for app in started:
        app.stop()


def _answers(apps, body, headers, chunks=None):
    direct, forwarded = apps
    mlflow_app = direct.watcher.current.scoring_app  # scoring_server.init(pyfunc) for this version

    async def scenario():
        answers = [await call(app, "POST", "/invocations", body, dict(headers), chunks=chunks)
                   for app in (direct, forwarded)]
        try:
            answers.append(await call(mlflow_app, "POST", "/invocations", body, dict(headers), chunks=chunks))
        except Exception:  # what uvicorn answers as a 500 when the app raises
            answers.append(Response(500, {}, b""))
        return answers

    return asyncio.run(scenario())


@pytest.mark.parametrize("case", VALID, ids=lambda case: case.name)
def test_valid_bodies_are_answered_as_mlflow_answers_them(apps, case):
    ours, ours_forwarded, theirs = _answers(apps, case.body, {"content-type": case.content_type})
    assert ours.status // 100 == ours_forwarded.status // 100 == theirs.status // 100, (
        ours.status, ours_forwarded.status, theirs.status, theirs.body[:300])
    if theirs.status == 200:
        assert ours.body == ours_forwarded.body == theirs.body
    else:
        assert 400 <= ours.status < 500 and ours.json()["message"]


def test_the_tensor_formats_are_predicted(apps):
    """The corpus is not vacuous: the formats this model's signature accepts get predictions."""
    direct, _ = apps
    tensors = [case for case in VALID if case.name.startswith(("inputs", "instances"))]
    assert len(tensors) >= 2, [case.name for case in VALID]
    for case in tensors:
        r = asyncio.run(post_json(direct, case.body, case.content_type))
        assert r.status == 200, (case.name, r.body[:300])


@pytest.mark.parametrize("case", PARSED_CASES, ids=lambda case: case.name)
def test_malformed_bodies_are_refused_on_both_paths(apps, case):
    chunks = case.chunks() if case.chunked else None
    ours, ours_forwarded, theirs = _answers(apps, case.body, case.headers, chunks)
    assert 400 <= ours.status < 500 and 400 <= ours_forwarded.status < 500, (ours.status, ours_forwarded.status)
    assert ours.status == ours_forwarded.status
    assert theirs.status >= 400  # MLflow never predicts these either (it answers some 500)


@pytest.mark.parametrize("case", WRONG_TYPES, ids=lambda case: case.name)
def test_wrong_types_are_refused_on_both_paths(apps, case):
    ours, ours_forwarded, theirs = _answers(apps, case.body, {"content-type": case.content_type})
    assert ours.status == ours_forwarded.status == 400
    assert ours.json()["message"] == ours_forwarded.json()["message"]
    if case.name in MLFLOW_PREDICTS:
        assert theirs.status == 200
    else:
        assert 400 <= theirs.status < 500, (theirs.status, theirs.body[:300])
