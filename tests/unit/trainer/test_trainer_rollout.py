"""`registry_cli canary | shadow | abort | promote` against a local sqlite registry: the
challenger alias and the tags serving reads from it."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
from mlflow.tracking import MlflowClient

from trainer import registry_cli

NAME = "fashion-mnist-cnn"


@pytest.fixture
def client(store):
    client = MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source="file:///nowhere")
    client.set_registered_model_alias(NAME, "production", "1")
    return client


def cli(capsys, *args):
    code = registry_cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def aliases(client):
    return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}


def tags(client, version):
    return client.get_model_version(NAME, version).tags


def test_canary_sets_the_challenger_and_its_share(client, capsys):
    assert cli(capsys, "canary", "2", "--percent", "10") == (
        0, "fashion-mnist-cnn@challenger -> version 2: canary, 10% of requests\n", "")
    assert aliases(client) == {"production": "1", "challenger": "2"}
    assert (tags(client, "2")["rollout.mode"], tags(client, "2")["rollout.percent"]) == ("canary", "10")
    # A new share for the same version only changes the tag.
    assert cli(capsys, "canary", "2", "--percent", "50")[0] == 0
    assert tags(client, "2")["rollout.percent"] == "50"


def test_shadow_replaces_a_running_canary(client, capsys):
    cli(capsys, "canary", "2")
    code, out, _ = cli(capsys, "shadow", "3")
    assert (code, out) == (0, "fashion-mnist-cnn@challenger -> version 3: shadow, 100% of requests scored in the "
                              "background; version 2's rollout ended\n")
    assert aliases(client)["challenger"] == "3"
    assert (tags(client, "3")["rollout.mode"], tags(client, "3")["rollout.percent"]) == ("shadow", "100")
    assert tags(client, "2")["rollout.outcome"] == "replaced by version 3"


def test_promote_completes_the_rollout(client, capsys):
    cli(capsys, "canary", "2", "--percent", "10")
    assert cli(capsys, "promote", "2")[:2] == (0, "fashion-mnist-cnn@production -> version 2 (was version 1)\n")
    assert aliases(client) == {"production": "2"}
    assert tags(client, "2")["rollout.outcome"] == "promoted"


def test_promoting_another_version_leaves_the_rollout_running(client, capsys):
    cli(capsys, "canary", "3")
    assert cli(capsys, "promote", "2")[0] == 0
    assert aliases(client) == {"production": "2", "challenger": "3"}


def test_abort_removes_the_challenger(client, capsys):
    cli(capsys, "shadow", "2")
    assert cli(capsys, "abort") == (0, "fashion-mnist-cnn@challenger removed: rollout of version 2 aborted\n", "")
    assert aliases(client) == {"production": "1"}
    assert (tags(client, "2")["rollout.mode"], tags(client, "2")["rollout.outcome"]) == ("ended", "aborted")
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(NAME, "challenger")
    code, out, err = cli(capsys, "abort")
    assert (code, out) == (2, "")
    assert err == ("python -m trainer.registry_cli: error: no rollout to abort: "
                   "no version of fashion-mnist-cnn holds @challenger\n")


def test_abort_without_the_right_to_remove_an_alias_still_ends_the_rollout(client, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)

    # As the trainer's account (EDIT on the model) is answered by the tracking server.
    monkeypatch.setattr(MlflowClient, "delete_registered_model_alias", denied)
    cli(capsys, "canary", "2")
    code, out, _ = cli(capsys, "abort")
    assert (code, out) == (0, "rollout of version 2 aborted: serving no longer routes to it; @challenger stays on it "
                              "(removing an alias needs MANAGE on the model, which this account lacks)\n")
    assert aliases(client)["challenger"] == "2"
    assert (tags(client, "2")["rollout.mode"], tags(client, "2")["rollout.outcome"]) == ("ended", "aborted")
    assert cli(capsys, "abort")[0] == 2  # nothing left to abort
    # The next rollout moves the alias, which EDIT allows.
    assert cli(capsys, "canary", "3")[1] == "fashion-mnist-cnn@challenger -> version 3: canary, 10% of requests\n"
    assert tags(client, "3")["rollout.mode"] == "canary"


def test_the_challenger_alias_is_a_setting(client, capsys):
    assert cli(capsys, "canary", "2", "--challenger-alias", "trial")[0] == 0
    assert aliases(client) == {"production": "1", "trial": "2"}
    assert cli(capsys, "abort", "--challenger-alias", "trial")[0] == 0
    assert aliases(client) == {"production": "1"}


@pytest.mark.parametrize("args, expected", [
    (("canary", "1"), "version 1 already holds @production: nothing to roll out"),
    (("canary", "9"), "fashion-mnist-cnn has no version 9 (versions: 1, 2, 3)"),
    (("canary", "2", "--percent", "0"), "--percent must be a number in (0, 100], got '0'"),
    (("canary", "2", "--percent", "ten"), "--percent must be a number in (0, 100], got 'ten'"),
    (("shadow", "2", "--challenger-alias", "production"), "--challenger-alias must differ from --model-alias"),
])
def test_bad_rollouts_are_one_line_and_change_nothing(client, capsys, args, expected):
    code, out, err = cli(capsys, *args)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith(f"python -m trainer.registry_cli: error: {expected}")
    assert aliases(client) == {"production": "1"}


def test_a_rollout_needs_a_production_version(client, capsys):
    client.delete_registered_model_alias(NAME, "production")
    code, _, err = cli(capsys, "canary", "2")
    assert code == 2 and "no version holds @production of fashion-mnist-cnn" in err
    assert aliases(client) == {}
