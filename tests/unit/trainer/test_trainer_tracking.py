"""The logging contract against a local MLflow store: what a user finds after a run."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import model_signatures
from trainer import config, data, registry_cli

ROOT = Path(__file__).resolve().parents[3]
EPOCHS, BATCH, LOG_EVERY = 2, 64, 2
STEPS_PER_EPOCH = 8  # 512 generated training images / batch 64
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # as an image build passes GIT_COMMIT


@pytest.fixture(scope="module")
def first(tmp_path_factory, data_dir, empty_store):
    """One tracked run of 2 epochs in a fresh store, shared by the contract tests."""
    from conftest import Result, fresh_store

    from trainer.__main__ import main

    root = tmp_path_factory.mktemp("store")
    uri = fresh_store(empty_store, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("GIT_COMMIT", COMMIT)
        mlflow.set_tracking_uri(uri)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["--data-dir", str(data_dir), "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
                         "--log-every", str(LOG_EVERY), "--run-name", "contract"])
        result = Result(code, out.getvalue(), "")
        assert result.code == 0, result.out
        yield {"uri": uri, "root": root, "result": result, "client": MlflowClient(uri)}


@pytest.fixture
def client(first, monkeypatch):
    monkeypatch.chdir(first["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first["uri"])
    mlflow.set_tracking_uri(first["uri"])
    return first["client"]


def run_of(first):
    return first["client"].get_run(first["result"].run_id)


def test_last_lines_say_run_version_and_promotion(first):
    summary = first["result"].summary
    assert summary == {"run": f"runs:/{first['result'].run_id}", "version": "1",
                       "promoted": "yes (no version held the alias)"}


def test_run_finished_with_every_flag_as_a_parameter(first):
    run = run_of(first)
    assert run.info.status == "FINISHED"
    params = run.data.params
    for setting in config.SETTINGS:
        if setting.name not in ("no_tracking", "tracking_uri", "no_download"):
            assert setting.name in params, setting.name
    assert params["epochs"] == "2" and params["arch"] == "small-cnn" and params["device"] == "cpu"
    assert params["train_samples"] == "512" and params["steps_per_epoch"] == str(STEPS_PER_EPOCH)


def test_tags_record_dataset_device_and_registration(first):
    tags = run_of(first).data.tags
    assert tags["dataset_sha256"] == data.checksum(tags_data_dir(first))
    assert tags["device"].startswith("cpu")
    # psutil is a dependency of the trainer: without it MLflow records no system metrics.
    assert tags["system_metrics"] == "on"
    assert tags["registered_version"] == "1" and tags["promoted"] == "yes"
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == COMMIT


def test_train_and_test_data_are_the_runs_datasets(first):
    sha256 = data.checksum(tags_data_dir(first))
    logged = {}
    for dataset_input in run_of(first).inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in dataset_input.tags}
        dataset = dataset_input.dataset
        logged[tags["mlflow.data.context"]] = (dataset.name, dataset.digest, tags["dataset_sha256"],
                                               json.loads(dataset.profile)["features_shape"],
                                               json.loads(dataset.source)["uri"])
    source = str((tags_data_dir(first) / "FashionMNIST" / "raw").resolve())
    assert logged == {
        "training": ("fashion-mnist-train", sha256[:32], sha256, [512, 28, 28], source),
        "evaluation": ("fashion-mnist-test", sha256[:32], sha256, [256, 28, 28], source),
    }


def tags_data_dir(first):
    return Path(run_of(first).data.params["data_dir"])


def test_metrics_carry_global_steps(client, first):
    run_id = first["result"].run_id
    total = EPOCHS * STEPS_PER_EPOCH
    for key in ("train_loss", "train_accuracy", "train_images_per_sec", "lr"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(LOG_EVERY, total + 1, LOG_EVERY)), key
    for key in ("eval_loss", "eval_accuracy", "epoch", "epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], key
    assert 0.0 <= run_of(first).data.metrics["eval_accuracy"] <= 1.0


def test_artifacts_summary_confusion_matrix_table_and_checkpoints(client, first):
    run_id = first["result"].run_id
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"model_summary.txt", "confusion_matrix.png", "per_class_accuracy.json", "checkpoints"} <= top
    checkpoints = sorted(a.path for a in client.list_artifacts(run_id, "checkpoints"))
    assert checkpoints == ["checkpoints/epoch-001-step-000000008.pt", "checkpoints/epoch-002-step-000000016.pt"]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="per_class_accuracy.json"))
    table = json.loads(local.read_text())
    assert [row[0] for row in table["data"]] == list(data.CLASSES)
    summary = mlflow.artifacts.load_text(f"runs:/{run_id}/model_summary.txt")
    assert "total parameters" in summary and "BatchNorm2d" in summary


def test_reference_statistics_are_logged_with_the_version(client, first):
    run_id = first["result"].run_id
    stats = mlflow.artifacts.load_dict(f"runs:/{run_id}/reference/stats.json")
    assert stats["classes"] == list(data.CLASSES) and stats["samples"] == 256
    assert len(stats["label_counts"]) == len(stats["prediction_counts"]) == 10
    assert sum(stats["label_counts"]) == sum(stats["prediction_counts"]) == 256
    assert len(stats["intensity_edges"]) == len(stats["intensity_counts"]) + 1
    assert sum(stats["intensity_counts"]) == 256 * 28 * 28


def version_files(client, version, tmp_path):
    """A copy of the version's files, as serving downloads them."""
    return Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri("fashion-mnist-cnn", version),
        dst_path=str(tmp_path / f"v{version}-{len(list(tmp_path.iterdir()))}")))


def verify(client, version, public, tmp_path):
    mv = client.get_model_version("fashion-mnist-cnn", version)
    expected = model_signatures.Provenance(registered_model="fashion-mnist-cnn", run_id=mv.run_id,
                                           model_id=model_signatures.logged_model_id(mv))
    try:
        model_signatures.verify(version_files(client, version, tmp_path), public, expected)
    except model_signatures.Refused as refused:
        pytest.fail(f"version {version} refused: {refused.reason} ({refused.detail})")


# Before the tests below load the model in place: with a local artifact store, that leaves
# files (a bytecode cache, registered_model_meta) in the store that the signature does not cover.
def test_logged_model_is_signed_for_its_version(client, first, signing_key, tmp_path):
    verify(client, "1", model_signatures.public_key_from_env(signing_key), tmp_path)
    provenance = json.loads((version_files(client, "1", tmp_path) / "provenance.json").read_text())
    assert provenance["run_id"] == first["result"].run_id


def test_sign_command_signs_a_version_logged_without_a_signature(client, first, signing_key, capsys, tmp_path):
    """What `make sign VERSION=1` does for a version from a release that did not sign."""
    public = model_signatures.public_key_from_env(signing_key)
    model_id = model_signatures.logged_model_id(client.get_model_version("fashion-mnist-cnn", "1"))
    stored = Path(urlparse(client.get_logged_model(model_id).artifact_location).path)
    for name in ("model.sig", "provenance.json"):
        (stored / name).unlink()
    with pytest.raises(pytest.fail.Exception, match="refused: it is not signed"):
        verify(client, "1", public, tmp_path)

    assert registry_cli.main(["sign", "1"]) == 0
    assert capsys.readouterr().out.strip() == "fashion-mnist-cnn version 1 signed"
    verify(client, "1", public, tmp_path)


def test_sign_command_refuses_a_loader_other_than_the_trainers(client, first, capsys, tmp_path):
    class Pickled(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run():
        logged = mlflow.pyfunc.log_model(name="model", python_model=Pickled(), pip_requirements=[])
    client.create_registered_model("pickled")
    version = client.create_model_version("pickled", logged.model_uri).version
    capsys.readouterr()
    assert registry_cli.main(["sign", str(version), "--model-name", "pickled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"version {version} not signed: it holds a pickled Python model" in err[0]
    files = mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri("pickled", version),
                                                dst_path=str(tmp_path / "pickled"))
    assert not (Path(files) / "model.sig").exists()


def test_sign_command_needs_the_private_key(client, first, monkeypatch, capsys):
    monkeypatch.delenv("MODEL_SIGNING_KEY")
    assert registry_cli.main(["sign", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("python -m trainer.registry_cli: error: MODEL_SIGNING_KEY is not set; "
                                               "run 'make env' (it writes the model signing key pair)")


def test_model_has_signature_example_metadata_and_pinned_requirements(client, first):
    info = mlflow.models.get_model_info("models:/fashion-mnist-cnn/1")
    (inputs,), (outputs,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inputs.type, tuple(inputs.shape)) == (np.dtype("float32"), (-1, 1, 28, 28))
    assert (outputs.type, tuple(outputs.shape)) == (np.dtype("float32"), (-1, 10))
    assert info.saved_input_example_info is not None
    assert info.metadata["classes"] == list(data.CLASSES)
    local = Path(mlflow.artifacts.download_artifacts("models:/fashion-mnist-cnn/1"))
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "numpy"}
    assert all("==" in r for r in requirements if not r.startswith("-"))


def test_registered_version_holds_the_alias_and_records_the_decision(client, first):
    version = client.get_model_version_by_alias("fashion-mnist-cnn", "production")
    assert str(version.version) == "1"
    assert version.tags["run_id"] == first["result"].run_id
    assert version.tags["promotion.decision"] == "promoted"
    assert float(version.tags["eval_accuracy"]) == pytest.approx(run_of(first).data.metrics["eval_accuracy"], abs=1e-6)


def test_served_model_loads_without_trainer_or_torchvision(first, tmp_path):
    """What the serving container does: pyfunc.load_model with torch, numpy, mlflow only."""
    script = """
import builtins, sys
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split(".")[0] in ("torchvision", "trainer"):
        raise ImportError("the serving image has no " + name)
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
import mlflow, numpy as np
model = mlflow.pyfunc.load_model("models:/fashion-mnist-cnn@production")
x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
p = model.predict(x)
print(p.dtype, p.shape, float(abs(p.sum(axis=1) - 1).max()) < 1e-5)
"""
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": first["uri"], "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=first["root"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "float32 (3, 10) True"


@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 1, 28, 28), np.float32), "the batch is empty"),
    (np.full((2, 1, 28, 28), np.nan, np.float32), "NaN or infinite"),
    (np.full((1, 1, 28, 28), np.inf, np.float32), "NaN or infinite"),
    (np.full((1, 1, 28, 28), 255.0, np.float32), "pixel values must be in [0, 1]"),
    (np.zeros((1, 28, 28), np.float32), "shape"),
    (np.zeros((1, 1, 28, 27), np.float32), "shape"),
])
def test_bad_input_is_an_invalid_parameter_error(client, bad, message):
    model = mlflow.pyfunc.load_model("models:/fashion-mnist-cnn@production")
    with pytest.raises(MlflowException) as error:
        model.predict(bad)
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"
    assert message.lower() in str(error.value).lower()


def test_if_better_keeps_the_alias_when_a_run_is_worse(client, train, first):
    # Plain SGD at a tiny rate barely moves from random weights: certainly worse.
    result = train("--epochs", "1", "--batch-size", "64", "--optimizer", "sgd", "--lr", "1e-6",
                   "--lr-schedule", "constant", "--log-every", "4")
    assert result.code == 0
    assert result.summary["version"] == "2"
    assert result.summary["promoted"].startswith("no (eval_accuracy ")
    assert "of version 1" in result.summary["promoted"]
    assert str(client.get_model_version_by_alias("fashion-mnist-cnn", "production").version) == "1"
    tags = client.get_model_version("fashion-mnist-cnn", "2").tags
    assert tags["promotion.decision"] == "not promoted"
    assert tags["promotion.holder_version"] == "1"
    assert float(tags["promotion.candidate_eval_accuracy"]) <= float(tags["promotion.holder_eval_accuracy"])


def test_resume_continues_from_the_last_checkpoint_in_a_new_run(client, train, first):
    first_id = first["result"].run_id
    result = train("--epochs", "3", "--batch-size", str(BATCH), "--log-every", str(LOG_EVERY),
                   "--resume-from", first_id, "--promotion-policy", "never")
    assert result.code == 0, result.err
    assert result.summary["promoted"] == "no (policy never)"
    resumed = client.get_run(result.run_id)
    assert result.run_id != first_id
    assert resumed.data.tags["resumed_from"] == first_id
    assert resumed.data.tags["resumed_checkpoint"] == "checkpoints/epoch-002-step-000000016.pt"
    train_steps = [m.step for m in client.get_metric_history(result.run_id, "train_loss")]
    assert sorted(train_steps) == list(range(2 * STEPS_PER_EPOCH + LOG_EVERY, 3 * STEPS_PER_EPOCH + 1, LOG_EVERY))
    assert [m.step for m in client.get_metric_history(result.run_id, "eval_accuracy")] == [3 * STEPS_PER_EPOCH]
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == [
        "checkpoints/epoch-003-step-000000024.pt"]

