"""Canary and shadow rollouts in-process: the share the challenger answers, shadow scoring
that never changes an answer, the automatic abort without a failed request, and restarts
that answer from the cached version before the registry does."""

import asyncio
import json
import random
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from serving_helpers import ONE_IMAGE_BODY, call, post_json, wait_until
from triton_requests import infer, result, triton_request

from serving import config
from serving.model_store import ModelStore


@pytest.fixture
def make_app(make_app):
    """The shared fixture's apps, judging rollouts by errors alone unless a test sets the
    latency ratio: on a busy machine one slow answer would abort a rollout whose routing is
    what the test is about."""
    return lambda name, **settings: make_app(name, **{"rollout_max_p99_ratio": 1000.0, **settings})


def roll_out(registry, name, version, mode, percent=None, started=None):
    """What `registry_cli canary|shadow` writes, through the test registry's client."""
    registry.client.set_model_version_tag(name, str(version), "rollout.mode", mode)
    if percent is not None:
        registry.client.set_model_version_tag(name, str(version), "rollout.percent", str(percent))
    if started is not None:
        registry.client.set_model_version_tag(name, str(version), "rollout.started_at", started)
    registry.point(name, version, alias="challenger")


def rollout_status(app):
    return app.rollout.status()


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(n)]


def body_of(image):
    return json.dumps({"inputs": image.tolist()}).encode()


def serving_both(app, production, challenger):
    return lambda: (app.watcher.status()["version"] == str(production)
                    and rollout_status(app)["challenger_version"] == str(challenger)
                    and rollout_status(app)["state"] == "active")


def rolled_out(registry, make_app, mode, percent=None, started=None, kinds=("good-a", "good-b"), **settings):
    """(name, app): version 1 in production, version 2 rolled out beside it, and a worker
    serving both."""
    name = registry.new_model(*kinds)
    registry.point(name, 1)
    roll_out(registry, name, 2, mode, percent, started)
    app = make_app(name, **settings)
    wait_until(serving_both(app, 1, 2), what="both versions served")
    return name, app


def test_canary_answers_its_share_of_requests(registry, make_app):
    name, app = rolled_out(registry, make_app, "canary", 30)
    assert rollout_status(app)["mode"] == "canary" and rollout_status(app)["percent"] == 30.0
    app.rollout.sampler = random.Random(7)

    async def send(n):
        return [await post_json(app, ONE_IMAGE_BODY) for _ in range(n)]

    answers = asyncio.run(send(400))
    assert {a.status for a in answers} == {200}
    by_challenger = sum(a.version == "2" for a in answers)
    # 30% of 400 is 120; three standard deviations of the binomial are 27.5 requests.
    assert 120 - 28 <= by_challenger <= 120 + 28, by_challenger
    assert {a.version for a in answers} == {"1", "2"}
    counts = rollout_status(app)["versions"]
    assert counts["2"]["requests"] == by_challenger and counts["1"]["requests"] == 400 - by_challenger
    assert counts["1"]["errors"] == counts["2"]["errors"] == 0

    # Removing the challenger alias (`registry_cli abort`) sends everything to production.
    registry.client.delete_registered_model_alias(name, "challenger")
    wait_until(lambda: rollout_status(app)["challenger_version"] is None, what="challenger dropped")
    assert rollout_status(app)["state"] == "none"
    assert {a.version for a in asyncio.run(send(50))} == {"1"}


def test_an_ended_rollout_is_dropped_even_where_its_alias_stays(registry, make_app):
    """`registry_cli abort` without the right to remove an alias marks the version ended."""
    name, app = rolled_out(registry, make_app, "canary", 100)
    assert asyncio.run(post_json(app, ONE_IMAGE_BODY)).version == "2"
    registry.client.set_model_version_tag(name, "2", "rollout.mode", "ended")
    wait_until(lambda: rollout_status(app)["challenger_version"] is None, what="challenger dropped")
    assert app.rollout.watcher.current is None  # not held in memory either
    assert {asyncio.run(post_json(app, ONE_IMAGE_BODY)).version for _ in range(20)} == {"1"}


def shadow_rows(version: str, agreed: str) -> float:
    return REGISTRY.get_sample_value("serving_shadow_rows_total", {"version": version, "agreed": agreed}) or 0.0


def test_shadow_never_changes_an_answer_and_counts_agreement(registry, make_app):
    name = registry.new_model("good-a", "good-b")
    registry.point(name, 1)
    app = make_app(name)
    wait_until(lambda: app.watcher.status()["version"] == "1", what="version 1 served")
    sent = images(40)
    alone = [asyncio.run(post_json(app, body_of(image))) for image in sent]

    before = {agreed: shadow_rows("2", agreed) for agreed in ("true", "false")}
    roll_out(registry, name, 2, "shadow")
    wait_until(serving_both(app, 1, 2), what="shadow loaded")
    production, challenger = app.watcher.current.pyfunc, app.rollout.watcher.current.pyfunc
    shadowed = [asyncio.run(post_json(app, body_of(image))) for image in sent]
    assert [(a.status, a.version, a.body) for a in shadowed] == [(200, "1", a.body) for a in alone]

    shadow = wait_until(lambda: (s := rollout_status(app)["shadow"].get("2")) and s["scored"] == 40 and s,
                        what="40 shadow scorings")
    stacked = np.concatenate(sent)
    agreed = int((production.predict(stacked).argmax(1) == challenger.predict(stacked).argmax(1)).sum())
    assert 0 < agreed < 40  # two different models: the count must tell them apart
    assert (shadow["compared_rows"], shadow["agreed_rows"]) == (40, agreed)
    assert shadow["agreement_rate"] == round(agreed / 40, 4)
    assert shadow["dropped"] == 0
    assert app.rollout.totals()["shadow"]["2"]["agreed_rows"] == agreed
    # The same counts reach /metrics, by version and agreement.
    assert shadow_rows("2", "true") - before["true"] == agreed
    assert shadow_rows("2", "false") - before["false"] == 40 - agreed
    # A body MLflow's own app reads is answered by production and skipped by the shadow.
    frame = b'{"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}'
    assert asyncio.run(post_json(app, frame)).version == "1"


@pytest.mark.parametrize(("binary_input", "binary_output"), [(True, True), (False, False)],
                         ids=["binary-tensors", "json-tensors"])
def test_shadow_scores_open_inference_requests_like_invocations(registry, make_app, binary_input, binary_output):
    """/v2 requests are shadowed too: the client gets production's answer, and agreement is
    counted on their rows, small batches and large ones (read off the event loop) alike."""
    _, app = rolled_out(registry, make_app, "shadow")
    production, challenger = app.watcher.current.pyfunc, app.rollout.watcher.current.pyfunc
    batches = [np.concatenate(images(rows, seed=rows)) for rows in (1, 8, 64)]
    for batch in batches:
        response = infer(app, *triton_request(batch, binary_input, binary_output))
        assert (response.status, response.version) == (200, "1"), response.body
        np.testing.assert_allclose(result(response).as_numpy("predictions"), production.predict(batch), rtol=1e-5)

    shadow = wait_until(lambda: (s := rollout_status(app)["shadow"].get("2")) and s["scored"] == 3 and s,
                        what="3 shadow scorings")
    stacked = np.concatenate(batches)
    agreed = int((production.predict(stacked).argmax(1) == challenger.predict(stacked).argmax(1)).sum())
    assert 0 < agreed < len(stacked)  # two different models: the count must tell them apart
    assert (shadow["compared_rows"], shadow["agreed_rows"], shadow["skipped"]) == (len(stacked), agreed, 0)
    # A request the protocol refuses is answered 400 by production and tells nothing of the shadow.
    assert infer(app, b"{inputs").status == 400
    wait_until(lambda: rollout_status(app)["shadow"]["2"]["skipped"] == 1, what="the refused request skipped")
    assert rollout_status(app)["versions"]["2"]["errors"] == 0


def test_a_full_shadow_queue_drops_instead_of_waiting(registry, make_app):
    _, app = rolled_out(registry, make_app, "shadow", 100, shadow_queue_size=1)
    app.rollout.stop()  # the shadow thread ends: nothing takes from the queue any more
    wait_until(lambda: not app.rollout._shadow_thread.is_alive(), what="shadow thread ended")
    answers = [asyncio.run(post_json(app, ONE_IMAGE_BODY)) for _ in range(5)]
    assert {(a.status, a.version) for a in answers} == {(200, "1")}
    assert rollout_status(app)["shadow"]["2"]["dropped"] == 4  # one waits in the queue


class FailsOnTraffic:
    """A model that passes serving's load check (its example is a zero image) and fails on
    every real request: its output cannot be written as JSON, a 500 from the model."""

    def __init__(self, pyfunc):
        self._pyfunc = pyfunc

    def __getattr__(self, name):
        return getattr(self._pyfunc, name)

    def predict(self, data, params=None):
        if np.asarray(data).max() > 0.25:
            return object()
        return self._pyfunc.predict(data)


class BreaksVersion2(ModelStore):
    def load(self, ref, path):
        loaded = super().load(ref, path)
        if ref.version == "2":
            loaded.pyfunc = FailsOnTraffic(loaded.pyfunc)
        return loaded


def test_a_failing_canary_is_aborted_without_a_failed_request(registry, make_app, tmp_path, serving_log):
    store = BreaksVersion2(str(tmp_path / "cache"), registry.tracking_uri, registry.client, registry.public_key)
    name, app = rolled_out(registry, make_app, "canary", 50, kinds=("good-a", "good-a"),
                           registry_client=registry.client, store=store, rollout_min_requests=10)

    async def until_aborted():
        answers = []
        while rollout_status(app)["state"] != "aborted":
            assert len(answers) < 1000, "never aborted"
            answers.append(await post_json(app, ONE_IMAGE_BODY))
        return answers

    answers = asyncio.run(until_aborted())
    assert {(a.status, a.version) for a in answers} == {(200, "1")}  # every challenger failure retried
    st = rollout_status(app)
    assert st["versions"]["2"]["errors"] == st["versions"]["2"]["requests"] >= 10
    [aborted] = st["aborted"]
    assert aborted["version"] == "2"
    assert aborted["reason"].startswith("error rate 100.0% against production's 0.0%")
    assert "ROLLOUT_MAX_ERROR_RATE_DELTA=0.05" in aborted["reason"]
    assert f"rollout of {name} version 2 aborted: error rate" in serving_log.text
    assert (asyncio.run(call(app, "GET", "/status"))).json()["rollout"]["state"] == "aborted"

    after = [asyncio.run(post_json(app, ONE_IMAGE_BODY)) for _ in range(50)]
    assert {(a.status, a.version) for a in after} == {(200, "1")}
    # Another worker of the container (same cache directory) stops routing to it too.
    other = make_app(name, registry_client=registry.client, store=store)
    wait_until(lambda: rollout_status(other)["challenger_version"] == "2", what="other worker loaded it")
    wait_until(lambda: rollout_status(other)["state"] == "aborted", what="other worker sees the abort")
    assert rollout_status(other)["aborted"][0]["reason"] == aborted["reason"]


def test_a_failing_shadow_is_aborted_and_never_seen(registry, make_app, tmp_path):
    store = BreaksVersion2(str(tmp_path / "cache"), registry.tracking_uri, registry.client, registry.public_key)
    _, app = rolled_out(registry, make_app, "shadow", kinds=("good-a", "good-a"),
                        registry_client=registry.client, store=store, rollout_min_requests=10)
    answers = [asyncio.run(post_json(app, ONE_IMAGE_BODY)) for _ in range(10)]
    assert {(a.status, a.version) for a in answers} == {(200, "1")}
    wait_until(lambda: rollout_status(app)["state"] == "aborted", what="shadow aborted")
    st = rollout_status(app)
    assert st["aborted"][0]["reason"].startswith("error rate 100.0% against production's 0.0%")
    assert st["shadow"]["2"]["agreed_rows"] == 0


def test_input_both_versions_refuse_is_not_the_canarys_error(registry, make_app):
    _, app = rolled_out(registry, make_app, "canary", 100)
    bad = asyncio.run(post_json(app, b'{"inputs": [[[["0.5"]]]]}'))
    assert bad.status == 400 and "wrong type" in bad.json()["message"]
    assert bad.version == "1"  # production's answer, as the challenger's was no better
    counts = rollout_status(app)["versions"]["2"]
    assert (counts["requests"], counts["errors"]) == (1, 0)


def test_a_slow_canary_is_aborted(registry, make_app):
    _, app = rolled_out(registry, make_app, "canary", 50, rollout_min_requests=5, rollout_max_p99_ratio=2.0)
    production, challenger = app.watcher.current, app.rollout.watcher.current
    # Latencies as recorded, not measured: the decision is what is tested, not the clock.
    for _ in range(5):
        app.rollout.record(production, False, 0.010)
        app.rollout.record(challenger, False, 0.015)
    assert rollout_status(app)["state"] == "active"  # 1.5x is within ROLLOUT_MAX_P99_RATIO=2
    app.rollout.record(challenger, False, 0.5)
    st = rollout_status(app)
    assert st["state"] == "aborted" and st["aborted"][0]["reason"].startswith("p99 latency")


def test_rolling_an_aborted_version_out_again_judges_it_afresh(registry, make_app):
    """An abort belongs to one rollout: it outlives a restart, and `registry_cli canary` run
    again for the same version (a new start) routes to it again with fresh counts."""
    name, app = rolled_out(registry, make_app, "canary", 50, started="2026-12-01T10:00:00+00:00",
                           rollout_min_requests=5)
    production, challenger = app.watcher.current, app.rollout.watcher.current
    for _ in range(5):
        app.rollout.record(production, False, 0.010)
        app.rollout.record(challenger, True, 0.010)
    assert rollout_status(app)["state"] == "aborted"
    restarted = make_app(name, rollout_min_requests=5)  # the same cache directory
    wait_until(lambda: rollout_status(restarted)["state"] == "aborted", what="the restart keeps the abort")

    roll_out(registry, name, 2, "canary", 50, started="2026-12-01T11:00:00+00:00")
    wait_until(lambda: rollout_status(app)["state"] == "active", what="the new rollout routed to")
    answers = [asyncio.run(post_json(app, ONE_IMAGE_BODY)) for _ in range(60)]
    assert {a.status for a in answers} == {200} and {a.version for a in answers} == {"1", "2"}
    # The errors of the aborted rollout are not held against this one.
    for _ in range(5):
        app.rollout.record(production, False, 0.010)
        app.rollout.record(challenger, False, 0.010)
    st = rollout_status(app)
    assert st["state"] == "active" and len(st["aborted"]) == 1, st


def test_any_rollout_start_tag_gives_a_working_abort_marker(registry, make_app, tmp_path):
    """The start tag is free text an EDIT holder writes; a long or path-like one neither
    looks aborted nor puts the marker outside the cache directory."""
    started = "../" * 200 + "x"
    _, app = rolled_out(registry, make_app, "canary", 50, started=started, rollout_min_requests=5)
    assert rollout_status(app)["state"] == "active"
    production, challenger = app.watcher.current, app.rollout.watcher.current
    for _ in range(5):
        app.rollout.record(production, False, 0.010)
        app.rollout.record(challenger, True, 0.010)
    assert rollout_status(app)["state"] == "aborted"
    markers = list((tmp_path / "cache").glob("*.aborted-*.json"))
    assert len(markers) == 1 and len(markers[0].name) < 200, markers


def test_unreadable_rollout_tags_route_nothing(registry, make_app):
    name = registry.new_model("good-a", "good-b")
    registry.point(name, 1)
    roll_out(registry, name, 2, "canary", "lots")
    app = make_app(name)
    wait_until(lambda: app.watcher.status()["version"] == "1" and rollout_status(app)["challenger_version"] == "2",
               what="production and the challenger loaded")
    assert rollout_status(app)["state"] == "invalid"
    assert {asyncio.run(post_json(app, ONE_IMAGE_BODY)).version for _ in range(20)} == {"1"}


class Unreachable:
    """A tracking server that does not answer (yet): every registry call fails."""

    def __init__(self, real):
        self.real = real
        self.up = False

    def __getattr__(self, name):
        if not self.up:
            raise ConnectionError("tracking server unreachable")
        return getattr(self.real, name)


def test_restart_serves_the_cached_version_before_the_registry_answers(registry, make_app, tmp_path):
    name = registry.new_model("good-a", "good-b")
    registry.point(name, 1)
    cache = tmp_path / "volume"
    first = make_app(name, cache=cache)
    wait_until(lambda: first.watcher.status()["version"] == "1", what="version 1 served")
    first.stop()

    registry.point(name, 2)  # moved while serving was down
    down = Unreachable(registry.client)
    second = make_app(name, cache=cache, registry_client=down)
    wait_until(lambda: second.watcher.status()["version"] == "1", what="cached version 1 served")
    answer = asyncio.run(post_json(second, ONE_IMAGE_BODY))
    assert (answer.status, answer.version) == (200, "1")
    st = second.watcher.status()
    assert st["warm_started_version"] == "1" and st["alias_version"] is None
    assert st["last_error"] == "cannot read the alias from the tracking server (the serving log says why)"

    down.up = True  # the registry answers: the alias moved, so the worker switches
    wait_until(lambda: second.watcher.status()["version"] == "2", what="switch to version 2")
    assert asyncio.run(post_json(second, ONE_IMAGE_BODY)).version == "2"


def test_a_corrupted_cache_is_ignored_and_downloaded_again(registry, make_app, tmp_path, serving_log):
    name = registry.new_model("good-a")
    registry.point(name, 1)
    cache = tmp_path / "volume"
    first = make_app(name, cache=cache)
    wait_until(lambda: first.watcher.status()["version"] == "1", what="version 1 served")
    path = Path(first.watcher.current.path)
    first.stop()
    (path / "MLmodel").write_text((path / "MLmodel").read_text() + "\n# damaged\n")

    second = make_app(name, cache=cache)
    wait_until(lambda: second.watcher.status()["version"] == "1", what="version 1 downloaded again")
    assert second.watcher.status()["warm_started_version"] is None
    assert ("cached copy of version 1 ignored (verifying it failed: its files differ from the files that were "
            "signed)") in serving_log.text
    assert asyncio.run(post_json(second, ONE_IMAGE_BODY)).status == 200


def test_an_unreadable_record_is_ignored(registry, make_app, tmp_path, serving_log):
    name = registry.new_model("good-a")
    registry.point(name, 1)
    cache = tmp_path / "volume"
    cache.mkdir()
    (cache / f"{name}_production.last-served.json").write_text("{not json")
    app = make_app(name, cache=cache)
    wait_until(lambda: app.watcher.status()["version"] == "1", what="version 1 served")
    assert "ignoring the record of the last served version" in serving_log.text
    assert app.watcher.status()["warm_started_version"] is None


KEYS = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MODEL_NAME": "m"}


@pytest.mark.parametrize("name, value, words", [
    ("ROLLOUT_MAX_ERROR_RATE_DELTA", "1.5", "expected a number from 0.0 to 1.0"),
    ("ROLLOUT_MAX_P99_RATIO", "0.5", "expected a number from 1.0 to 1000.0"),
    ("ROLLOUT_MIN_REQUESTS", "0", "expected an integer from 1 to 1000000"),
    ("ROLLOUT_WINDOW_SECONDS", "soon", "expected a number"),
    ("SHADOW_QUEUE_SIZE", "-1", "expected an integer"),
    ("SERVING_WARM_START", "maybe", "expected true or false"),
    ("CHALLENGER_ALIAS", "latest", "not 'latest'"),
    ("CHALLENGER_ALIAS", "production", "CHALLENGER_ALIAS='production' is not valid: it must differ from MODEL_ALIAS"),
])
def test_rollout_settings_are_checked_in_one_line(registry, name, value, words):
    env = {**KEYS, **registry.keys, name: value}
    env.pop("MODEL_SIGNING_KEY", None)
    with pytest.raises(config.ConfigError) as e:
        config.from_env(env)
    message = str(e.value)
    assert name in message and words in message and "\n" not in message
