"""model_signatures.verify binds signed files to the version the registry names, also for an
account from which the registry hides the version's run (serving may not read runs)."""

from pathlib import Path

import pytest
from signing_keys import signing_key_pair

import model_signatures
from model_signatures import Provenance, Refused

MLMODEL = """flavors:
  python_function:
    loader_module: mlflow.pyfunc.loaders.code_model
    model_code_path: served_model.py
"""


@pytest.fixture
def signed(tmp_path):
    keys = signing_key_pair()
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text(MLMODEL)
    (model / "served_model.py").write_text("# the trainer's model code\n")
    made_for = Provenance(registered_model="cnn", run_id="run-1", model_id="m-1")
    model_signatures.sign(model, model_signatures.private_key_from_env(keys), made_for)
    return model, model_signatures.public_key_from_env(keys)


def test_the_version_it_was_signed_for_verifies(signed):
    model, public = signed
    model_signatures.verify(model, public, Provenance(registered_model="cnn", run_id="run-1", model_id="m-1"))


def test_a_hidden_run_is_not_compared_but_the_logged_model_still_is(signed):
    model, public = signed
    model_signatures.verify(model, public, Provenance(registered_model="cnn", run_id=None, model_id="m-1"))
    with pytest.raises(Refused, match="signed for another model version"):
        model_signatures.verify(model, public, Provenance(registered_model="cnn", run_id=None, model_id="m-2"))


def test_nothing_to_bind_to_is_refused(signed):
    model, public = signed
    with pytest.raises(Refused, match="signed for another model version"):
        model_signatures.verify(model, public, Provenance(registered_model="cnn", run_id=None, model_id=None))


def test_a_signed_model_is_logged_in_its_runs_experiment_whatever_experiment_is_active(tmp_path):
    """The logged model's files go where the run's experiment keeps artifacts, not to the
    active (default) experiment's location."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("signed", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    keys = signing_key_pair()

    def save(path, mlflow_model):
        Path(path).mkdir()
        mlflow_model.add_flavor("python_function", loader_module="mlflow.pyfunc.loaders.code_model")
        mlflow_model.save(f"{path}/MLmodel")

    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model_uri = model_signatures.log_signed_model(save, "model", "cnn",
                                                      model_signatures.private_key_from_env(keys), run_id=run_id)
    finally:
        mlflow.set_tracking_uri(saved)
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.experiment_id == experiment
    assert (tmp_path / "artifacts").exists() and any((tmp_path / "artifacts").rglob("model.sig"))
