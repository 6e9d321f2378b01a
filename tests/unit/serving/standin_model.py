"""A stand-in for the trainer's model, with the same contract: float32 [-1, 1, 28, 28] in
[0, 1] in, float32 [-1, 10] softmax probabilities out, non-finite input refused with
INVALID_PARAMETER_VALUE. Logged as "models from code"; `model_config` picks the weights
(`seed`), a way to break (`fail`: "load" or "predict"), makes rows depend on each
other (`couple`: normalises over the batch, so requests must not be stacked), or writes
a marker file when it loads (`marker`: a path), to show that a refused version never ran."""

from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException


class StandInClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        config = context.model_config or {}
        self.fail = config.get("fail")
        self.couple = bool(config.get("couple"))
        if config.get("marker"):
            Path(config["marker"]).write_text("the code of a refused model ran\n")
        if self.fail == "load":
            raise RuntimeError("stand-in refuses to load")
        rng = np.random.default_rng(int(config.get("seed", 0)))
        self.weights = rng.standard_normal((28 * 28, 10)).astype(np.float32)

    def predict(self, context, model_input, params=None):
        x = np.asarray(model_input, dtype=np.float32)
        if not np.isfinite(x).all():
            raise MlflowException.invalid_parameter_value("input contains NaN or infinity")
        if self.fail == "predict":
            raise RuntimeError("stand-in cannot predict")
        if self.couple:
            x = x - x.mean(axis=0, keepdims=True)
        logits = x.reshape(len(x), -1) @ self.weights
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


mlflow.models.set_model(StandInClassifier())
