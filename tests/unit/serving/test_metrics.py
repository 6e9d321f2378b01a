"""GET /metrics in-process: the bearer token it requires, and the counters a user would
watch moving with requests and with the versions the watcher loads, swaps and refuses."""

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from serving_helpers import ONE_IMAGE_BODY, call, post_json, wait_until

from serving import config

TOKEN = "s3cret-metrics-token-0123456789"


@pytest.fixture
def make_app(make_app):
    """Apps with a metrics token (the conftest's make_app underneath)."""
    def make(name, token=TOKEN):
        return make_app(name, metrics_token=SecretStr(token))

    return make


def scrape(app, authorization=f"Bearer {TOKEN}"):
    headers = {"authorization": authorization} if authorization is not None else {}
    return asyncio.run(call(app, "GET", "/metrics", headers=headers))


def samples(app):
    """Every sample of a scrape, as {(name, sorted labels): value}. Values are process-wide
    (tests run one at a time), so tests compare before and after."""
    answer = scrape(app)
    assert answer.status == 200, answer.body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.body.decode())
        for s in family.samples
    }


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def serving_version(app, version):
    return lambda: app.watcher.status()["version"] == str(version)


def test_metrics_need_the_bearer_token(registry, make_app):
    app = make_app(registry.new_model("good-a"))

    missing = scrape(app, authorization=None)
    assert missing.status == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="serving metrics"'
    assert missing.json()["error_code"] == "UNAUTHENTICATED"
    assert "Authorization: Bearer" in missing.json()["message"]

    for wrong in (f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN):
        refused = scrape(app, authorization=wrong)
        assert refused.status == 401, wrong
        assert refused.headers["www-authenticate"].startswith("Bearer realm=")
        assert TOKEN not in refused.body.decode()

    wrong = scrape(app, authorization="Bearer not-the-token")
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    assert wrong.json()["message"] == "the bearer token is not the one in SERVING_METRICS_TOKEN"

    good = scrape(app, authorization=f"bearer {TOKEN}")  # the scheme is case-insensitive
    assert good.status == 200
    assert good.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "serving_requests_in_flight" in good.body.decode()


def test_metrics_are_off_without_a_token(registry, make_app):
    app = make_app(registry.new_model("good-a"), token="")
    answer = scrape(app)
    assert answer.status == 404
    assert answer.json()["message"] == "metrics are off: SERVING_METRICS_TOKEN is not set"


def test_a_short_token_is_refused_at_start_without_echoing_it(registry):
    with pytest.raises(config.ConfigError) as refused:
        config.from_env({
            "MLFLOW_TRACKING_URI": "http://mlflow:5000",
            "MODEL_NAME": "fashion",
            "MODEL_SIGNING_PUBLIC_KEY": registry.keys["MODEL_SIGNING_PUBLIC_KEY"],
            "SERVING_METRICS_TOKEN": "hunter2",
        })
    assert str(refused.value) == ("SERVING_METRICS_TOKEN is too short: use at least 16 random characters "
                                  "(make env writes one)")


def test_requests_are_counted_by_status_and_version(registry, make_app):
    name = registry.new_model("good-a")
    app = make_app(name)
    wait_until(lambda: app.watcher.polls >= 1, what="first poll")

    before = samples(app)
    assert asyncio.run(post_json(app, ONE_IMAGE_BODY)).status == 503  # nothing served yet
    registry.point(name, 1)
    wait_until(serving_version(app, 1), what="version 1 served")

    two_images = json.dumps({"inputs": [[[[0.5] * 28] * 28]] * 2}).encode()
    for body in (ONE_IMAGE_BODY, two_images):
        assert asyncio.run(post_json(app, body)).status == 200
    assert asyncio.run(post_json(app, b'{"inputs": [[["x"]]]}')).status == 400
    after = samples(app)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("serving_requests_total", code="503", version="none") == 1
    assert moved("serving_requests_total", code="200", version="1") == 2
    assert moved("serving_requests_total", code="400", version="1") == 1
    assert moved("serving_request_duration_seconds_count", version="1") == 3
    assert moved("serving_request_duration_seconds_bucket", version="1", le="10.0") == 3
    # Rows of the two tensor bodies that parsed: 1 and 2 images.
    assert moved("serving_request_rows_count") == 2
    assert moved("serving_request_rows_sum") == 3
    assert moved("serving_request_rows_bucket", le="1.0") == 1
    assert value(after, "serving_requests_in_flight") == 0
    assert value(after, "serving_model_version") == 1
    assert value(after, "serving_model_alias_version") == 1
    assert value(after, "serving_worker_resident_memory_bytes") > 0
    # Other routes are not scoring requests.
    asyncio.run(call(app, "GET", "/ping"))
    assert moved("serving_requests_total", code="200", version="1") == 2


def test_open_inference_requests_are_counted_like_invocations(registry, make_app):
    import numpy as np
    import tritonclient.http as triton

    name = registry.new_model("good-a")
    registry.point(name, 1)
    served = make_app(name)
    wait_until(serving_version(served, 1), what="version 1 served")

    tensor = triton.InferInput("inputs", [3, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((3, 1, 28, 28), np.float32), binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body([tensor])
    path = f"/v2/models/{served.settings.model_name}/infer"
    before = samples(served)
    assert asyncio.run(call(served, "POST", path, body, {"Inference-Header-Content-Length": str(length)})).status == 200
    assert asyncio.run(call(served, "POST", path, b"{}")).status == 400
    asyncio.run(call(served, "GET", f"/v2/models/{served.settings.model_name}"))  # metadata is not scoring
    after = samples(served)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("serving_requests_total", code="200", version="1") == 1
    assert moved("serving_requests_total", code="400", version="1") == 1
    assert moved("serving_request_rows_sum") == 3


def test_loads_swaps_refusals_and_failures_are_counted(registry, make_app):
    name = registry.new_model("good-a", "unsigned", "broken-load", "good-b")
    registry.point(name, 1)
    app = make_app(name)
    before = samples(app)
    wait_until(serving_version(app, 1), what="version 1 served")

    def tried(version):
        registry.point(name, version)
        wait_until(lambda: (app.watcher.status()["last_error"] or "").startswith(f"version {version}"),
                   what=f"version {version} tried")
        return samples(app)

    refused = tried(2)
    failed = tried(3)
    registry.point(name, 4)
    wait_until(serving_version(app, 4), what="version 4 served")
    after = samples(app)

    def moved(found, name, **labels):
        return value(found, name, **labels) - value(before, name, **labels)

    assert moved(refused, "serving_model_loads_total") == 1
    assert moved(refused, "serving_model_swaps_total") == 1
    assert moved(refused, "serving_model_refusals_total") >= 1  # retried while the alias stays
    assert moved(refused, "serving_model_load_duration_seconds_count", outcome="loaded") == 1
    assert moved(refused, "serving_model_load_duration_seconds_count", outcome="refused") >= 1
    assert value(refused, "serving_model_version") == 1
    assert value(refused, "serving_model_alias_version") == 2

    assert moved(failed, "serving_model_load_failures_total", step="load") >= 1
    assert moved(failed, "serving_model_load_failures_total", step="download") == 0
    assert moved(failed, "serving_model_load_duration_seconds_count", outcome="failed") >= 1
    assert value(failed, "serving_model_version") == 1
    assert value(failed, "serving_model_alias_version") == 3

    assert moved(after, "serving_model_loads_total") == 2
    assert moved(after, "serving_model_swaps_total") == 2
    assert value(after, "serving_model_version") == 4
    assert value(after, "serving_model_alias_version") == 4
