"""Promotion policies, alias history and the `python -m trainer.registry_cli` commands."""

import json

import pytest
from mlflow.tracking import MlflowClient

from trainer import registry, registry_cli

NAME, ALIAS = "fashion-mnist-cnn", "production"


@pytest.fixture
def client(store):
    client = MlflowClient()
    client.create_registered_model(NAME)
    return client


def add_version(client, accuracy, dataset="d1"):
    tags = {"eval_accuracy": f"{accuracy:.6f}", "dataset_sha256": dataset, "eval_samples": "256"}
    version = client.create_model_version(NAME, source="file:///nowhere", tags=tags)
    return str(version.version)


def holder(client):
    return str(client.get_model_version_by_alias(NAME, ALIAS).version)


def test_if_better_moves_the_alias_only_for_a_strictly_better_version(client):
    v1 = add_version(client, 0.80)
    assert registry.promote_by_policy(NAME, ALIAS, v1, "if-better").promoted
    v2 = add_version(client, 0.79)
    decision = registry.promote_by_policy(NAME, ALIAS, v2, "if-better")
    assert not decision.promoted and holder(client) == v1
    assert decision.reason == "eval_accuracy 0.7900 <= 0.8000 of version 1"
    v3 = add_version(client, 0.80)
    assert not registry.promote_by_policy(NAME, ALIAS, v3, "if-better").promoted  # a tie is not better
    v4 = add_version(client, 0.85)
    decision = registry.promote_by_policy(NAME, ALIAS, v4, "if-better")
    assert decision.promoted and holder(client) == v4
    assert decision.reason == "eval_accuracy 0.8500 > 0.8000 of version 1"
    tags = client.get_model_version(NAME, v4).tags
    assert (tags["promotion.policy"], tags["promotion.decision"]) == ("if-better", "promoted")
    assert (tags["promotion.holder_version"], tags["promotion.holder_eval_accuracy"]) == ("1", "0.800000")
    assert tags["promotion.candidate_eval_accuracy"] == "0.850000"
    assert client.get_model_version(NAME, v2).tags["promotion.decision"] == "not promoted"


def test_a_comparison_across_test_sets_says_so(client):
    registry.promote_by_policy(NAME, ALIAS, add_version(client, 0.80, dataset="d1"), "if-better")
    decision = registry.promote_by_policy(NAME, ALIAS, add_version(client, 0.90, dataset="d2"), "if-better")
    assert decision.promoted and decision.reason.endswith(", evaluated on a different test set")


def test_always_and_never(client):
    v1 = add_version(client, 0.9)
    assert not registry.promote_by_policy(NAME, ALIAS, v1, "never").promoted
    assert client.get_registered_model(NAME).aliases == {}
    assert registry.promote_by_policy(NAME, ALIAS, v1, "always").promoted
    v2 = add_version(client, 0.1)
    assert registry.promote_by_policy(NAME, ALIAS, v2, "always").promoted and holder(client) == v2
    v3 = add_version(client, 0.99)
    assert not registry.promote_by_policy(NAME, ALIAS, v3, "never").promoted and holder(client) == v2


def test_alias_history_is_kept_on_the_registered_model(client):
    for accuracy in (0.7, 0.8, 0.9):
        registry.promote_by_policy(NAME, ALIAS, add_version(client, accuracy), "if-better")
    history = json.loads(client.get_registered_model(NAME).tags["alias_history.production"])
    assert [(e["version"], e["how"]) for e in history] == [("1", "if-better"), ("2", "if-better"), ("3", "if-better")]


def cli(capsys, *args):
    code = registry_cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_shows_versions_accuracy_and_the_alias_holder(client, capsys):
    for accuracy in (0.7, 0.8):
        registry.promote_by_policy(NAME, ALIAS, add_version(client, accuracy), "if-better")
    code, out, _ = cli(capsys, "list")
    assert code == 0
    header, second, first = out.strip().splitlines()
    assert header.split() == ["version", "run_id", "eval_accuracy", "created", "(UTC)", "aliases"]
    assert second.split()[0] == "2" and second.split()[2] == "0.8000" and second.endswith("@production")
    assert first.split()[0] == "1" and first.endswith("-")


def test_promote_and_rollback_walk_the_history(client, capsys):
    for accuracy in (0.7, 0.8, 0.9):
        registry.promote_by_policy(NAME, ALIAS, add_version(client, accuracy), "if-better")
    assert cli(capsys, "promote", "1")[:2] == (0, "fashion-mnist-cnn@production -> version 1 (was version 3)\n")
    assert cli(capsys, "rollback")[:2] == (
        0, "fashion-mnist-cnn@production -> version 3 (rolled back from version 1)\n")
    assert cli(capsys, "rollback")[1] == "fashion-mnist-cnn@production -> version 2 (rolled back from version 3)\n"
    assert cli(capsys, "rollback")[1] == "fashion-mnist-cnn@production -> version 1 (rolled back from version 2)\n"
    code, out, err = cli(capsys, "rollback")
    assert (code, out) == (2, "")
    assert err == ("python -m trainer.registry_cli: error: nothing to roll back to: "
                   "no earlier holder of @production of fashion-mnist-cnn is recorded\n")
    assert holder(client) == "1"


def test_rollback_returns_to_a_holder_set_outside_the_trainer(client, capsys):
    v1, v2 = add_version(client, 0.5), add_version(client, 0.6)
    client.set_registered_model_alias(NAME, ALIAS, v1)  # e.g. from the MLflow UI
    assert cli(capsys, "promote", v2)[0] == 0
    assert cli(capsys, "rollback")[0] == 0 and holder(client) == v1


def test_unknown_version_exits_2_with_one_line(client, capsys):
    add_version(client, 0.5)
    code, out, err = cli(capsys, "promote", "7")
    assert (code, out) == (2, "")
    assert err == "python -m trainer.registry_cli: error: fashion-mnist-cnn has no version 7 (versions: 1)\n"
    code, _, err = cli(capsys, "promote", "seven")
    assert code == 2 and "VERSION must be a version number" in err


def test_unknown_model_is_a_clear_error(store, capsys):
    code, _, err = cli(capsys, "list", "--model-name", "nothing-here")
    assert code == 2 and "no registered model named 'nothing-here'" in err


@pytest.mark.parametrize("args, expected", [((), "Missing command."), (("promote",), "Missing argument 'VERSION'."),
                                            (("list", "--model-alias", "latest"), "--model-alias must be letters")])
def test_incomplete_or_bad_commands_are_one_line_and_contact_nothing(args, expected, capsys, monkeypatch):
    monkeypatch.setattr(registry_cli, "connect", lambda *a: pytest.fail("contacted the tracking server"))
    code, out, err = cli(capsys, *args)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith(f"python -m trainer.registry_cli: error: {expected}")
