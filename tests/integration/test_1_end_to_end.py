"""What a new user does after `make up`: train, look at the tracking server, predict."""

from __future__ import annotations

import requests
from mlflow import MlflowClient
from stack import TEST_IMAGES, Stack


def test_serving_is_healthy_and_waits_before_any_model(stack: Stack):
    status = stack.serving_status()
    assert status["state"] == "waiting"
    response = requests.post(f"{stack.serving_url}/invocations", json={"inputs": [[[[0.0] * 28] * 28]]}, timeout=10)
    assert response.status_code == 503
    assert stack.env["MODEL_ALIAS"] in response.text


def test_training_registers_and_promotes_the_first_version(trained):
    assert trained["version"] == "1"
    assert trained["promoted"].startswith("yes")
    assert "/#/experiments/" in trained["run"]


def test_run_holds_params_metrics_and_model(stack: Stack, trained, admin_client: MlflowClient):
    run_id = trained["run"].rstrip("/").rsplit("/", 1)[-1]
    run = admin_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2"
    assert run.data.params["batch_size"] == "32"
    eval_acc = admin_client.get_metric_history(run_id, "eval_accuracy")
    assert [m.step for m in eval_acc] == sorted(m.step for m in eval_acc) and len(eval_acc) == 2
    assert eval_acc[-1].value > 0.5
    assert len(admin_client.get_metric_history(run_id, "train_loss")) >= 2
    top_level = {a.path for a in admin_client.list_artifacts(run_id)}
    assert any("confusion" in p for p in top_level), top_level


def test_registered_version_holds_the_alias(stack: Stack, trained, admin_client: MlflowClient):
    version = admin_client.get_model_version_by_alias(stack.env["MODEL_NAME"], stack.env["MODEL_ALIAS"])
    assert version.version == trained["version"]


def test_serving_answers_with_ten_scores_per_image_well_above_chance(stack: Stack, trained):
    stack.wait_served_version(trained["version"], timeout=120)
    sample = stack.sample(TEST_IMAGES)
    response = requests.post(f"{stack.serving_url}/invocations", json={"inputs": sample["inputs"]}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == trained["version"]
    predictions = response.json()["predictions"]
    assert len(predictions) == TEST_IMAGES
    assert all(len(scores) == 10 for scores in predictions)
    assert all(abs(sum(scores) - 1) < 1e-3 for scores in predictions)
    predicted = [max(range(10), key=scores.__getitem__) for scores in predictions]
    accuracy = sum(p == t for p, t in zip(predicted, sample["labels"])) / TEST_IMAGES
    assert accuracy > 0.5, f"accuracy {accuracy:.2f} on the generated test set"


def test_curl_example_from_the_readme_works(stack: Stack, trained):
    stack.wait_served_version(trained["version"], timeout=120)
    one_image = {"inputs": [[[[0.0] * 28] * 28]]}
    response = requests.post(f"{stack.serving_url}/invocations", json=one_image, timeout=30)
    assert response.status_code == 200
    assert len(response.json()["predictions"][0]) == 10


def test_tritons_client_gets_the_same_scores_through_the_open_inference_protocol(stack: Stack, trained):
    import numpy as np
    import tritonclient.http as triton

    stack.wait_served_version(trained["version"], timeout=120)
    sample = stack.sample(TEST_IMAGES)
    images = np.asarray(sample["inputs"], dtype=np.float32)
    expected = requests.post(f"{stack.serving_url}/invocations", json={"inputs": sample["inputs"]}, timeout=60)
    client = triton.InferenceServerClient(stack.serving_url.removeprefix("http://"), network_timeout=60)
    try:
        name = stack.env["MODEL_NAME"]
        assert client.is_server_ready()
        assert client.is_model_ready(name)
        metadata = client.get_model_metadata(name)
        assert metadata["versions"] == [trained["version"]]
        assert metadata["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        tensor = triton.InferInput("inputs", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=True)
        answer = client.infer(name, [tensor], outputs=[triton.InferRequestedOutput("predictions", binary_data=True)])
    finally:
        client.close()
    assert answer.get_response()["model_version"] == trained["version"]
    np.testing.assert_allclose(answer.as_numpy("predictions"), expected.json()["predictions"], rtol=1e-5, atol=1e-6)
