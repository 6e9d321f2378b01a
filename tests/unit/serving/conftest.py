"""A throwaway MLflow registry (sqlite + local artifacts) holding stand-in model versions."""

import contextlib
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
# The serving package (repo root) and serving_helpers (this folder), whatever the
# pytest import mode.
for path in (str(HERE.parents[2]), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)


class StandInRegistry:
    """Logged once per session; each test registers its own model name so that alias
    moves in one test never reach another."""

    def __init__(self, tracking_uri, client, sources):
        self.tracking_uri = tracking_uri
        self.client = client
        self.sources = sources  # kind -> (model source URI, run id)

    def new_model(self, *kinds):
        """Register a fresh model whose versions 1, 2, ... are the given kinds."""
        name = f"fashion-{uuid.uuid4().hex[:8]}"
        self.client.create_registered_model(name)
        for kind in kinds:
            self.add_version(name, kind)
        return name

    def add_version(self, name, kind):
        source, run_id = self.sources[kind]
        # The registry looks the logged model (models:/m-...) up through MLflow's global
        # tracking URI, whatever the client was given.
        with _global_tracking_uri(self.tracking_uri):
            return self.client.create_model_version(name, source=source, run_id=run_id)

    def point(self, name, version, alias="production"):
        self.client.set_registered_model_alias(name, alias, str(version))


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
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("stand-in", artifact_location=(root / "artifacts").as_uri())
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )
    example = np.zeros((1, 1, 28, 28), dtype=np.float32)
    kinds = {
        "good-a": ({"seed": 1}, example),
        "good-b": ({"seed": 2}, example),
        "no-example": ({"seed": 3}, None),  # validated with a zero image of the signature
        "broken-predict": ({"fail": "predict"}, None),
        "broken-load": ({"fail": "load"}, None),
        "batch-coupled": ({"seed": 4, "couple": True}, example),
    }
    sources = {}
    # Logging goes through MLflow's global tracking URI (which also sets the environment
    # variable); it is put back as soon as the models are logged, so that no other test
    # and no subprocess sees this registry by accident.
    with _global_tracking_uri(uri):
        for kind, (model_config, input_example) in kinds.items():
            with mlflow.start_run(experiment_id=experiment) as run:
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(HERE / "standin_model.py"),
                    model_config=model_config,
                    signature=signature,
                    input_example=input_example,
                    pip_requirements=[],
                    metadata={"classes": [f"class-{i}" for i in range(10)]},
                )
            sources[kind] = (info.model_uri, run.info.run_id)
    return StandInRegistry(uri, client, sources)

