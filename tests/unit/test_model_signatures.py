"""model_signatures.verify binds signed files to the version the registry names, also for an
account from which the registry hides the version's run (serving may not read runs)."""

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
