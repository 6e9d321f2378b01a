"""Flags and their environment defaults: checked before anything is logged."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SIGNING_ENV

from trainer import config, sample, synthetic

ROOT = Path(__file__).resolve().parents[3]


def run_cli(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_defaults_match_the_documented_contract():
    conf = config.parse([], environ={"MODEL_SIGNING_KEY": SIGNING_ENV["MODEL_SIGNING_KEY"]})
    assert (conf.epochs, conf.batch_size, conf.lr, conf.optimizer, conf.seed) == (10, 128, 0.001, "adamw", 42)
    assert (conf.arch, conf.device, conf.data_dir) == ("small-cnn", "auto", Path("./data"))
    assert (conf.experiment_name, conf.model_name, conf.model_alias) == (
        "fashion-mnist", "fashion-mnist-cnn", "production")
    assert conf.promotion_policy == "if-better"
    assert (conf.max_train_samples, conf.max_test_samples, conf.tracking, conf.download) == (0, 0, True, True)
    assert conf.tracking_uri is None  # MLflow's own default applies


def test_environment_sets_defaults_and_flags_override_them():
    environ = {"TRAINER_EPOCHS": "3", "TRAINER_BATCH_SIZE": "32", "TRAINER_LR": "0.01", "TRAINER_OPTIMIZER": "sgd",
               "TRAINER_SEED": "7", "TRAINER_DEVICE": "cpu", "TRAINER_ARCH": "quickstart", "DATA_DIR": "/data",
               "EXPERIMENT_NAME": "exp", "MODEL_NAME": "m", "MODEL_ALIAS": "staging", "PROMOTION_POLICY": "never",
               "TRAINER_MAX_TRAIN_SAMPLES": "100", "TRAINER_MAX_TEST_SAMPLES": "50", "TRAINER_LOG_EVERY": "5",
               "TRAINER_CONNECT_TIMEOUT": "5", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
               "TRAINER_NO_TRACKING": "yes"}
    conf = config.parse([], environ=environ)
    assert (conf.epochs, conf.batch_size, conf.lr, conf.optimizer, conf.seed, conf.device) == (
        3, 32, 0.01, "sgd", 7, "cpu")
    assert (conf.arch, conf.data_dir, conf.experiment_name, conf.model_name) == (
        "quickstart", Path("/data"), "exp", "m")
    assert (conf.model_alias, conf.promotion_policy, conf.log_every, conf.connect_timeout) == (
        "staging", "never", 5, 5.0)
    assert (conf.max_train_samples, conf.max_test_samples, conf.tracking) == (100, 50, False)
    assert conf.tracking_uri == "http://mlflow:5000"
    assert config.parse(["--epochs", "4", "--arch", "small-cnn"], environ=environ).epochs == 4


@pytest.mark.parametrize("args, environ, expected", [
    (["--epochs", "0"], {}, "--epochs must be an integer from 1 to 10000, got '0'"),
    (["--batch-size", "many"], {}, "--batch-size must be an integer from 2 to 65536"),
    (["--lr", "0"], {}, "--lr must be a number in (0, 10]"),
    (["--lr", "nan"], {}, "--lr must be a number in (0, 10]"),
    (["--optimizer", "adam"], {}, "--optimizer must be one of adamw, sgd"),
    (["--device", "tpu"], {}, "--device must be one of auto, cpu, cuda"),
    (["--arch", "resnet"], {}, "--arch must be one of small-cnn, quickstart"),
    (["--promotion-policy", "sometimes"], {}, "--promotion-policy must be one of if-better, always, never"),
    (["--seed", "-1"], {}, "--seed must be an integer from 0 to 4294967295"),
    (["--max-train-samples", "-5"], {}, "--max-train-samples must be an integer from 0"),
    (["--model-alias", "v3"], {}, "--model-alias must be letters, digits"),
    (["--model-name", "a/b"], {}, "--model-name must be a registered model name without '/' or ':'"),
    (["--tracking-uri", "ftp://x"], {}, "--tracking-uri must be a tracking URI"),
    (["--resume-from", "last"], {}, "--resume-from must be a 32-character run id"),
    ([], {"TRAINER_EPOCHS": "ten"}, "--epochs (from TRAINER_EPOCHS) must be an integer from 1 to 10000, got 'ten'"),
    ([], {"PROMOTION_POLICY": "maybe"}, "--promotion-policy (from PROMOTION_POLICY) must be one of"),
    ([], {"TRAINER_NO_TRACKING": "perhaps"}, "--no-tracking (from TRAINER_NO_TRACKING) must be a boolean"),
])
def test_a_bad_value_names_the_flag_and_the_accepted_range(args, environ, expected):
    with pytest.raises(config.ConfigError) as error:
        config.parse(args, environ=environ)
    assert expected in str(error.value)


def test_bad_value_exits_2_with_one_line_and_creates_no_run(tmp_path):
    db = tmp_path / "mlflow.db"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
           "TRAINER_EPOCHS": "0"}
    result = run_cli("--data-dir", str(tmp_path), env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "python -m trainer: error: --epochs (from TRAINER_EPOCHS) must be an integer from 1 to 10000, got '0'"]
    assert not db.exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("value, expected", [
    (None, "MODEL_SIGNING_KEY is not set; run 'make env' (it writes the model signing key pair)"),
    ("", "MODEL_SIGNING_KEY is not set; run 'make env' (it writes the model signing key pair)"),
    ("pem?", "MODEL_SIGNING_KEY is not valid: expected a PEM key as one base64 line"),
    (SIGNING_ENV["MODEL_SIGNING_PUBLIC_KEY"],
     "MODEL_SIGNING_KEY is not valid: expected an unencrypted PEM private key as one base64 line"),
])
def test_tracked_run_without_a_usable_signing_key_exits_2_and_creates_nothing(tmp_path, value, expected):
    db = tmp_path / "mlflow.db"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    if value is not None:
        env["MODEL_SIGNING_KEY"] = value
    result = run_cli("--data-dir", str(tmp_path), env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"python -m trainer: error: {expected}"]
    assert not db.exists() and not (tmp_path / "mlruns").exists()


def test_untracked_run_needs_no_signing_key():
    conf = config.parse(["--no-tracking"], environ={})
    assert conf.signing_key is None
    # The key never shows, wherever a Config is printed.
    keyed = config.parse([], environ={"MODEL_SIGNING_KEY": SIGNING_ENV["MODEL_SIGNING_KEY"]})
    assert SIGNING_ENV["MODEL_SIGNING_KEY"][:40] not in repr(keyed) and "BEGIN" not in repr(keyed)


def test_signing_key_is_read_from_the_environment_only():
    # A flag would show the secret in `ps` and in shell history.
    assert not [s.flag for s in config.SETTINGS if "KEY" in s.envvar or "key" in s.flag]
    with pytest.raises(config.ConfigError, match="No such option '--signing-key'"):
        config.parse(["--signing-key", "x"], environ={})


def test_unknown_flag_is_one_line_and_status_2():
    result = run_cli("--epoch", "3")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--epoch" in result.stderr


def test_help_documents_every_flag_with_its_environment_variable():
    result = run_cli("--help")
    assert result.returncode == 0
    for setting in config.SETTINGS:
        assert setting.flag in result.stdout
        assert setting.envvar in result.stdout


def test_readme_flag_table_is_the_declared_one():
    # Regenerate with `python -m trainer.config` when a flag changes.
    readme = (ROOT / "trainer" / "README.md").read_text()
    assert config.flag_table() in readme
    assert config.flag_table().count("\n| `--") == len(config.SETTINGS)


def test_cuda_requested_without_a_gpu_is_a_configuration_error(monkeypatch):
    import torch

    from trainer import loop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(config.ConfigError, match="--device is 'cuda' but PyTorch sees no CUDA device"):
        loop.pick_device("cuda")
    assert loop.pick_device("auto").type == "cpu"


@pytest.mark.parametrize("module, args, expected", [
    (synthetic, ["--train", "0"], "python -m trainer.synthetic: error: --train must be an integer from 1 to 10000000, "
                                  "got '0'"),
    (sample, ["--count", "0"], "python -m trainer.sample: error: --count must be an integer from 1 to 10000, got '0'"),
])
def test_the_data_tools_answer_a_bad_value_with_one_line(module, args, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--data-dir", str(tmp_path), *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [expected]
    assert list(tmp_path.iterdir()) == []
