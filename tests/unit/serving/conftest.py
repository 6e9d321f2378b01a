"""A throwaway MLflow registry (sqlite + local artifacts) holding stand-in model versions,
signed the way the trainer signs its models, and versions that serving must refuse."""

import contextlib
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from refused_models import REFUSED_KINDS  # this folder: pytest puts a conftest's folder on the path
from serving_helpers import POLL, wait_until
from signing_keys import signing_key_pair  # tests/signing_keys.py

import model_signatures
from serving import config
from serving.app import ServingApp

HERE = Path(__file__).parent

STANDIN_CODE = str(HERE / "standin_model.py")

class StandInRegistry:
    """Each test registers its own model name, so that alias moves in one test never reach
    another. Every version is a logged model of its own, signed for the name it is
    registered under, as the trainer does it."""

    def __init__(self, tracking_uri, client, runs, configs, keys, other_key, marker):
        self.tracking_uri = tracking_uri
        self.client = client
        self.runs = runs  # kind -> run id
        self.configs = configs  # kind -> (model_config, input example)
        self.keys = keys  # the stack's pair, as environment variables
        self.public_key = model_signatures.public_key_from_env(keys)
        self._private_key = model_signatures.private_key_from_env(keys)
        self._other_key = other_key
        self.marker = marker  # written by the code of any refused version that runs

    def new_model(self, *kinds):
        """Register a fresh model whose versions 1, 2, ... are the given kinds."""
        name = f"fashion-{uuid.uuid4().hex[:8]}"
        self.client.create_registered_model(name)
        for kind in kinds:
            self.add_version(name, kind)
        return name

    def run_id(self, kind):
        return self.runs[kind]

    def add_version(self, name, kind):
        # The registry looks the logged model (models:/m-...) up through MLflow's global
        # tracking URI, whatever the client was given.
        with _global_tracking_uri(self.tracking_uri):
            source = self._log(name, kind)
            return self.client.create_model_version(name, source=source, run_id=self.runs[kind])

    def point(self, name, version, alias="production"):
        self.client.set_registered_model_alias(name, alias, str(version))

    def _log(self, name, kind):
        import mlflow

        run_id = self.runs[kind]
        if kind == "unsigned":
            with mlflow.start_run(run_id=run_id):
                return mlflow.pyfunc.log_model(name="model", python_model=STANDIN_CODE,
                                               model_config={"marker": str(self.marker)},
                                               pip_requirements=[]).model_uri
        key = {"other-key": self._other_key}.get(kind, self._private_key)
        signed_for = "someone-else" if kind == "other-model" else name
        uri = model_signatures.log_signed_model(self._saver(kind), "model", signed_for, key, run_id=run_id)
        if kind == "altered-code":
            # What a writer of the artifact store could do after registration.
            evil = self.marker.parent / "altered" / Path(STANDIN_CODE).name
            evil.parent.mkdir(exist_ok=True)
            evil.write_text(f"from pathlib import Path\nPath({str(self.marker)!r}).write_text('ran')\n"
                            + Path(STANDIN_CODE).read_text())
            self.client.log_model_artifact(uri.removeprefix("models:/"), str(evil))
        return uri

    def _saver(self, kind):
        import mlflow
        import refused_models

        def save(path, mlflow_model):
            if kind == "pickled":
                mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model,
                                         python_model=refused_models.Pickled(str(self.marker)),
                                         pip_requirements=[])
            elif kind == "other-loader":
                data = self.marker.parent / "marker-path.txt"
                data.write_text(str(self.marker))
                mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, loader_module="refused_models",
                                         data_path=str(data), pip_requirements=[])
            else:
                model_config, example = self.configs[kind]
                mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, python_model=STANDIN_CODE,
                                         model_config=model_config, signature=_signature(),
                                         input_example=example, pip_requirements=[],
                                         metadata={"classes": [f"class-{i}" for i in range(10)]})

        return save


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


@contextlib.contextmanager
def _global_tracking_uri(uri):
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None unsets it again


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("stand-in", artifact_location=(root / "artifacts").as_uri())
    example = np.zeros((1, 1, 28, 28), dtype=np.float32)
    configs = {
        "good-a": ({"seed": 1}, example),
        "good-b": ({"seed": 2}, example),
        "no-example": ({"seed": 3}, None),  # validated with a zero image of the signature
        "broken-predict": ({"fail": "predict"}, None),
        "broken-load": ({"fail": "load"}, None),
        "batch-coupled": ({"seed": 4, "couple": True}, example),
        # Code that would write the marker, if it ever ran.
        **{kind: ({"seed": 5, "marker": str(root / "marker")}, example) for kind in REFUSED_KINDS},
    }
    runs = {kind: client.create_run(experiment).info.run_id for kind in configs}
    return StandInRegistry(uri, client, runs, configs, signing_key_pair(),
                           model_signatures.private_key_from_env(signing_key_pair()), root / "marker")


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    """One app serving version 1 of a good model, shared by a module's many requests that
    change nothing (bad input, protocol cases)."""
    name = registry.new_model("good-a")
    registry.point(name, 1)
    settings = config.Settings(tracking_uri=registry.tracking_uri, model_name=name, public_key=registry.public_key,
                               poll_seconds=POLL, cache_dir=str(tmp_path_factory.mktemp("cache")))
    app = ServingApp(settings)
    app.start()
    wait_until(lambda: app.watcher.status()["version"] == "1", what="version 1 served")
    yield app
    app.stop()


@pytest.fixture
def make_app(registry, tmp_path):
    """make(name, cache=None, registry_client=None, store=None, **settings): a started
    ServingApp for a model of the test registry; every app made is stopped after the test."""
    apps = []

    def make(name, cache=None, registry_client=None, store=None, **overrides):
        settings = config.Settings(tracking_uri=registry.tracking_uri, model_name=name,
                                   public_key=registry.public_key, poll_seconds=POLL,
                                   cache_dir=str(cache or tmp_path / "cache"), **overrides)
        app = ServingApp(settings, registry=registry_client, store=store)
        app.start()
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.stop()


@pytest.fixture
def serving_log(caplog):
    """What serving logs (its logger does not propagate to pytest's)."""
    logger = logging.getLogger("serving")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
