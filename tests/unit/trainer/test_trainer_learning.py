"""Learning on generated data: loss goes down, runs repeat exactly, resumes are seamless."""

import io

import pytest
import torch
from conftest import SIGNING_ENV
from torchvision.datasets import FashionMNIST

from trainer import checkpoints, config, data, job, loop, synthetic

CPU = torch.device("cpu")


class Recorder:
    """Stands in for MLflow: keeps every logged metric with its step."""

    def __init__(self):
        self.records = []

    def log(self, metrics, step):
        self.records.append((step, dict(metrics)))

    def flush(self):
        pass

    def series(self, key):
        return [(step, m[key]) for step, m in self.records if key in m]


def conf_of(*args):
    return config.parse(["--device", "cpu", *args], environ={"MODEL_SIGNING_KEY": SIGNING_ENV["MODEL_SIGNING_KEY"]})


@pytest.fixture(scope="module")
def splits(data_dir):
    return data.load(data_dir, download=False)


def fit(conf, splits, state=None, stop=lambda: False):
    state = state or job.build(conf, CPU)
    recorder = Recorder()
    evaluation = job.fit(state, *splits, conf, recorder, stop)
    return state.model, evaluation, recorder


def test_synthetic_files_are_where_torchvision_looks_and_it_reads_them(tmp_path):
    synthetic.main(["--data-dir", str(tmp_path), "--train", "30", "--test", "20", "--seed", "3"])
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data.RAW_FILES)
    train = FashionMNIST(root=tmp_path, train=True, download=False)
    test = FashionMNIST(root=tmp_path, train=False, download=False)
    assert train.data.shape == (30, 28, 28) and train.data.dtype == torch.uint8
    assert test.data.shape == (20, 28, 28) and int(test.targets.max()) < 10


@pytest.mark.parametrize("arch", ["small-cnn", "quickstart"])
def test_a_few_steps_lower_the_loss(arch, splits):
    conf = conf_of("--arch", arch, "--epochs", "1", "--batch-size", "32", "--log-every", "1")
    _, _, recorder = fit(conf, splits)
    losses = [loss for _, loss in recorder.series("train_loss")]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_default_recipe_learns_generated_data_well_above_chance(splits):
    # What the integration tests rely on: 2 epochs, batch 32, a few hundred images.
    _, evaluation, _ = fit(conf_of("--epochs", "2", "--batch-size", "32"), splits)
    assert evaluation["accuracy"] > 0.6


def test_same_seed_same_metrics_on_cpu(splits):
    conf = conf_of("--epochs", "2", "--batch-size", "64", "--log-every", "2")

    def deterministic(recorder):
        return [(step, {k: v for k, v in m.items() if k not in ("train_images_per_sec", "epoch_seconds")})
                for step, m in recorder.records]

    first, second = fit(conf, splits)[2], fit(conf, splits)[2]
    assert deterministic(first) == deterministic(second)
    other_seed = fit(conf_of("--epochs", "2", "--batch-size", "64", "--log-every", "2", "--seed", "1"), splits)[2]
    assert deterministic(other_seed) != deterministic(first)


def test_steps_are_global_and_eval_comes_at_each_epoch_end(splits):
    conf = conf_of("--epochs", "2", "--batch-size", "64", "--log-every", "3")
    _, _, recorder = fit(conf, splits)
    steps_per_epoch = data.steps_per_epoch(len(splits[0]), 64)
    # Every third global step, plus each epoch's last step so short epochs still report.
    expected = sorted(set(range(3, 2 * steps_per_epoch + 1, 3)) | {steps_per_epoch, 2 * steps_per_epoch})
    assert [s for s, _ in recorder.series("train_loss")] == expected
    assert [s for s, _ in recorder.series("eval_accuracy")] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [v for _, v in recorder.series("epoch")] == [1, 2]


@pytest.mark.parametrize("stop_at_step", [8, 11])  # an epoch boundary and mid-epoch
def test_resuming_a_checkpoint_repeats_the_uninterrupted_run(splits, stop_at_step):
    conf = conf_of("--epochs", "3", "--batch-size", "64", "--log-every", "1")
    straight_model, straight_eval, straight = fit(conf, splits)

    state = job.build(conf, CPU)
    with pytest.raises(loop.StopRequested):
        fit(conf, splits, state, stop=lambda: state.progress.global_step >= stop_at_step)
    buffer = io.BytesIO()
    torch.save(checkpoints.state(state, conf), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_state = job.build(conf, CPU)  # fresh weights, then the checkpoint's
    checkpoints.restore(saved, resumed_state)
    assert resumed_state.progress.global_step == stop_at_step
    resumed_model, resumed_eval, resumed = fit(conf, splits, resumed_state)

    assert resumed_eval["loss"] == straight_eval["loss"]
    assert torch.equal(resumed_eval["confusion"], straight_eval["confusion"])
    for key, value in straight_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    after = [(s, m["train_loss"]) for s, m in straight.records if "train_loss" in m and s > stop_at_step]
    assert [(s, m["train_loss"]) for s, m in resumed.records if "train_loss" in m] == after


def test_checkpoint_for_another_architecture_is_refused():
    conf = conf_of("--arch", "quickstart", "--epochs", "3")
    saved = {"arch": "small-cnn", "optimizer_name": "adamw", "epoch": 1, "step_in_epoch": 0}
    with pytest.raises(checkpoints.CheckpointError, match="trained with --arch small-cnn"):
        checkpoints.check_compatible(saved, conf)
    saved["arch"] = "quickstart"
    saved["epoch"] = 3
    with pytest.raises(checkpoints.CheckpointError, match="pass --epochs above 3"):
        checkpoints.check_compatible(saved, conf)


def test_missing_data_names_the_directory_and_the_files(tmp_path):
    with pytest.raises(data.DataError) as error:
        data.load(tmp_path / "empty", download=False)
    message = str(error.value)
    assert str((tmp_path / "empty" / "FashionMNIST" / "raw").resolve()) in message
    for name in data.RAW_FILES:
        assert name in message
