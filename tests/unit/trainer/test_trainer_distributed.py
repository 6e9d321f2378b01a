"""Several processes, one run: `python -m trainer --nproc N`, multi-node checks and elastic restarts.

The launches run `python -m trainer` as a user would, on CPU with gloo, against a SQLite
store in a temp dir; the data is the small generated set of conftest.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import SIGNING_ENV, fresh_store
from mlflow.tracking import MlflowClient

from trainer import config, data, launch, loop
from trainer.distributed import FAULT_EXIT_ENV, OncePerStep
from trainer.world import World

ROOT = Path(__file__).resolve().parents[3]
# 512 training images over 2 ranks: 256 each, 8 steps of 32 per rank and epoch, global batch 64.
EPOCHS, BATCH, LOG_EVERY, STEPS_PER_EPOCH = 2, 32, 2, 8
RECIPE = ("--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--log-every", str(LOG_EVERY), "--device", "cpu")


def trainer_cli(*args, cwd, env_extra=None, timeout=600):
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(cwd),
           "MODEL_SIGNING_KEY": SIGNING_ENV["MODEL_SIGNING_KEY"], **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    sys.stdout.write(out + err)  # shown by pytest when a test fails
    return process.returncode, out, err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The shares and collectives, in-process.


def test_ranks_take_equal_disjoint_shares_of_the_same_order():
    order = data.epoch_order(103, seed=42, epoch=3, device=torch.device("cpu"))
    shares = [World(rank, 4).shard(order) for rank in range(4)]
    assert [len(share) for share in shares] == [25] * 4  # the 3 left over are dropped
    together = torch.cat(shares)
    assert len(set(together.tolist())) == 100 and set(together.tolist()) <= set(order.tolist())
    assert World().shard(order) is order  # one process: the order as it always was


def test_train_and_eval_metrics_are_summed_over_ranks(monkeypatch):
    # Two identical ranks, simulated: the sum doubles every count, and the averages stay.
    doubled = []

    def twice(self, tensor):
        doubled.append(tensor.shape)
        return tensor.mul_(2)

    monkeypatch.setattr(World, "sum", twice)
    world = World(0, 2)
    meter = loop.Meter(torch.device("cpu"), world)
    meter.add(torch.tensor(0.5), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
    metrics = meter.read()
    assert doubled and metrics["loss"] == pytest.approx(0.5) and metrics["accuracy"] == pytest.approx(2 / 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    split = data.Split(torch.zeros(6, 28, 28, dtype=torch.uint8), torch.zeros(6, dtype=torch.int64))
    evaluation = loop.evaluate(model, split, torch.device("cpu"), world=world)
    # Rank 0 sees images 0, 2, 4; doubled they stand for all six.
    assert int(evaluation["confusion"].sum()) == 6


def test_a_restart_logs_only_steps_the_run_does_not_have():
    class Recorder:
        def __init__(self):
            self.records = []

        def log(self, metrics, step):
            self.records.append((step, dict(metrics)))

        def flush(self):
            pass

    recorder = Recorder()
    logger = OncePerStep(recorder, {"train_loss": 10, "eval_loss": 8})
    for step in (10, 12):
        logger.log({"train_loss": 1.0, "lr": 0.1}, step)
    logger.log({"eval_loss": 2.0}, 8)
    assert recorder.records == [(10, {"lr": 0.1}), (12, {"train_loss": 1.0, "lr": 0.1})]


# Bad input: one line, a non-zero status, nothing started.


@pytest.mark.parametrize("args, expected", [
    (["--nproc", "0"], "--nproc must be an integer from 1 to 1024, got '0'"),
    (["--nnodes", "0"], "--nnodes must be an integer from 1 to 1024, got '0'"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h", "--rdzv-id", "j"],
     "--node-rank must be below --nnodes (2), got 2"),
    (["--nnodes", "2", "--rdzv-id", "j"], "--nnodes 2 needs --rdzv-endpoint, the same on every node"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:29400"], "--nnodes 2 needs --rdzv-id, the same on every node"),
    (["--rdzv-endpoint", "http://node0"], "--rdzv-endpoint must be host or host:port"),
])
def test_bad_launch_options_are_refused_by_name(args, expected):
    with pytest.raises(config.ConfigError) as error:
        config.parse(args, environ={"TRAINER_NO_TRACKING": "1"})
    assert expected in str(error.value)


def test_options_come_from_the_environment_too():
    conf = config.parse([], environ={"TRAINER_NO_TRACKING": "1", "TRAINER_NPROC": "4", "TRAINER_NNODES": "2",
                                     "TRAINER_NODE_RANK": "1", "TRAINER_RDZV_ENDPOINT": "node0:29400",
                                     "TRAINER_RDZV_ID": "job-7", "TRAINER_MAX_RESTARTS": "3"})
    assert (conf.nproc, conf.nnodes, conf.node_rank, conf.rdzv_endpoint, conf.rdzv_id, conf.max_restarts) == (
        4, 2, 1, "node0:29400", "job-7", 3)
    assert (conf.lr_scaling, conf.rdzv_timeout) == ("none", 300)


def test_nproc_zero_exits_2_with_one_line(tmp_path):
    code, out, err = finished(trainer_cli("--nproc", "0", "--data-dir", str(tmp_path), cwd=tmp_path), timeout=120)
    assert code == 2
    assert err.strip().splitlines() == [
        "python -m trainer: error: --nproc must be an integer from 1 to 1024, got '0'"]


def test_more_processes_than_cores_or_gpus_are_refused_before_anything_starts(train, store, capsys, monkeypatch):
    cores = launch.usable_cores()
    result = train("--device", "cpu", "--nproc", str(cores + 1))
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        f"python -m trainer: error: --nproc {cores + 1} asks for more processes than the {cores} CPU core(s) "
        "this node lets the trainer use"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = train("--device", "cuda", "--nproc", "2")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        "python -m trainer: error: --device is 'cuda' but PyTorch sees no CUDA device; use auto or cpu"]
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_nproc_1_is_the_single_process_trainer(train, store, monkeypatch):
    def no_launcher(*args, **kwargs):
        raise AssertionError("--nproc 1 must not start the launcher")

    monkeypatch.setattr(launch, "run", no_launcher)
    monkeypatch.setenv("TRAINER_NPROC", "1")
    result = train("--epochs", "1", "--batch-size", "64", "--log-every", "2")
    assert result.code == 0, result.err
    params = MlflowClient().get_run(result.run_id).data.params
    assert (params["nproc"], params["nnodes"]) == ("1", "1") and "world_size" not in params


def test_a_rendezvous_endpoint_that_never_answers_fails_in_bounded_time(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = finished(trainer_cli(
        "--no-tracking", "--data-dir", str(tmp_path), "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
        endpoint, "--rdzv-id", "job", "--rdzv-timeout", "3", cwd=tmp_path), timeout=300)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: the rendezvous endpoint {endpoint} did not answer within --rdzv-timeout 3 s")


def test_nodes_that_never_join_fail_the_run_with_the_reason(tmp_path, data_dir, empty_store):
    uri = fresh_store(empty_store, tmp_path)
    endpoint = f"127.0.0.1:{free_port()}"
    code, out, err = finished(trainer_cli(
        *RECIPE, "--data-dir", str(data_dir), "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", endpoint,
        "--rdzv-id", "job", "--rdzv-timeout", "3", cwd=tmp_path, env_extra={"MLFLOW_TRACKING_URI": uri}),
        timeout=300)
    assert code == 1
    reason = f"not all 2 node(s) joined the rendezvous at {endpoint} within --rdzv-timeout 3 s"
    assert f"error: {reason}" in err.splitlines()
    (run,) = MlflowClient(uri).search_runs(MlflowClient(uri).search_experiments()[0].experiment_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == reason


def test_nodes_started_with_different_settings_are_refused(tmp_path, data_dir):
    endpoint = f"127.0.0.1:{free_port()}"
    common = ("--no-tracking", "--data-dir", str(data_dir), "--epochs", "1", "--device", "cpu", "--nnodes", "2",
              "--rdzv-endpoint", endpoint, "--rdzv-id", "job", "--rdzv-timeout", "120")
    nodes = [trainer_cli(*common, "--node-rank", "0", "--batch-size", "64", cwd=tmp_path),
             trainer_cli(*common, "--node-rank", "1", "--batch-size", "32", cwd=tmp_path)]
    results = [finished(node) for node in nodes]
    # The rendezvous, not --node-rank, decides which node's process is rank 0.
    expected = [f"python -m trainer: error: rank 1 was started with another training configuration than rank 0: "
                f"--batch-size is {theirs} there and {ours} on rank 0; start every node with the same image, data and "
                "arguments" for theirs, ours in ((32, 64), (64, 32))]
    for code, _, err in results:
        assert code == 2
        (line,) = err.strip().splitlines()
        assert line in expected


# One run, two processes, one of which dies: the run continues and ends FINISHED.


@pytest.fixture(scope="module")
def elastic(tmp_path_factory, data_dir, empty_store):
    root = tmp_path_factory.mktemp("elastic")
    uri = fresh_store(empty_store, root)
    # Rank 1 dies abruptly once it has done global step 11 (mid-epoch 2), on the first attempt only.
    code, out, err = finished(trainer_cli(
        *RECIPE, "--data-dir", str(data_dir), "--nproc", "2", "--max-restarts", "1", "--run-name", "ddp",
        cwd=root, env_extra={"MLFLOW_TRACKING_URI": uri, FAULT_EXIT_ENV: "1:11"}))
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {"code": code, "out": out, "err": err, "run": run, "client": client, "uri": uri}


def test_two_processes_make_one_finished_run_with_their_shape_as_parameters(elastic):
    assert elastic["code"] == 0, elastic["err"]
    run = elastic["run"]
    assert run.info.status == "FINISHED" and run.info.run_name == "ddp"
    params = run.data.params
    assert (params["world_size"], params["nnodes"], params["nproc_per_node"], params["backend"]) == (
        "2", "1", "2", "gloo")
    assert (params["batch_size_per_rank"], params["global_batch_size"], params["steps_per_epoch"]) == (
        "32", "64", str(STEPS_PER_EPOCH))
    assert params["lr_scaling"] == "none" and float(params["lr_effective"]) == float(params["lr"])
    summary = dict(line.split(": ", 1) for line in elastic["out"].strip().splitlines()[-3:])
    assert summary == {"run": f"runs:/{run.info.run_id}", "version": "1",
                       "promoted": "yes (no version held the alias)"}


def test_one_version_is_registered_from_the_evaluation_of_every_test_image(elastic):
    client = elastic["client"]
    (model,) = client.search_registered_models()
    (version,) = client.search_model_versions(f"name='{model.name}'")
    assert version.tags["run_id"] == elastic["run"].info.run_id
    assert version.tags["eval_samples"] == "256"
    # The confusion matrix is summed over both ranks' halves of the test set.
    mlflow.set_tracking_uri(elastic["uri"])
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=elastic["run"].info.run_id, artifact_path="per_class_accuracy.json")).read_text())
    assert sum(row[table["columns"].index("images")] for row in table["data"]) == 256


def test_a_dead_worker_is_restarted_and_every_step_is_logged_once(elastic):
    assert f"{FAULT_EXIT_ENV}: rank 1 exits abruptly at global step 11" in elastic["err"]
    client, run_id = elastic["client"], elastic["run"].info.run_id
    expected = list(range(LOG_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, LOG_EVERY))
    for key in ("train_loss", "train_accuracy", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == expected, key
    epoch_ends = [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(EPOCHS)]
    for key in ("eval_loss", "eval_accuracy", "epoch"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == epoch_ends, key
    # Averaged over both ranks' 2 x 32 images per step since the previous log: multiples of 1/128.
    for metric in client.get_metric_history(run_id, "train_accuracy"):
        assert (metric.value * 128) == pytest.approx(round(metric.value * 128))
    assert elastic["run"].data.tags["restarts"] == "1"
    (restart,) = client.get_metric_history(run_id, "restarts")
    assert restart.value == 1 and restart.step in range(STEPS_PER_EPOCH, 12)
    names = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert f"checkpoints/epoch-002-step-{EPOCHS * STEPS_PER_EPOCH:09d}.pt" in names
