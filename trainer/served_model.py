"""The served FashionMNIST classifier, as `mlflow.pyfunc.load_model` runs it.

MLflow stores this file inside the logged model ("models from code"), so the serving
container needs torch, numpy and mlflow only: no torchvision and no trainer package. The
weights are a frozen TorchScript module with the standardisation baked in.

Input: float32 [N, 1, 28, 28] pixel intensities in [0, 1] (what torchvision's ToTensor
gives). Output: float32 [N, 10] softmax probabilities in FashionMNIST class order; the
class names are in the model's metadata under "classes".
"""

import warnings
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

IMAGE_SHAPE = (1, 28, 28)


def invalid(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE is what makes MLflow's scoring server answer 400, not 500.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def check_images(model_input: Any) -> np.ndarray:
    """Return model_input as a C-contiguous float32 array, or raise a readable 400."""
    if isinstance(model_input, dict) or hasattr(model_input, "columns"):
        raise invalid("expected a tensor of images shaped [N, 1, 28, 28], e.g. {\"inputs\": [...]}, "
                      f"got {type(model_input).__name__}")
    try:
        images = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise invalid(f"images must be numbers shaped [N, 1, 28, 28]: {error}") from None
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise invalid(f"images must be shaped [N, 1, 28, 28], got {list(images.shape)}")
    if images.shape[0] == 0:
        raise invalid("the batch is empty: send at least one image")
    if not np.isfinite(images).all():
        raise invalid("images contain NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise invalid(f"pixel values must be in [0, 1] (ToTensor scale), got [{low:g}, {high:g}]; "
                      "divide 0-255 pixels by 255")
    return np.ascontiguousarray(images)


class FashionMNISTClassifier(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        with warnings.catch_warnings():
            # torch 2.15 marks TorchScript deprecated; it still loads, and it is what
            # keeps the served model free of any Python source besides this file.
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            self.module = torch.jit.load(context.artifacts["torchscript"], map_location="cpu")
        self.module.eval()

    # The np.ndarray hint tells MLflow to validate against the logged signature only.
    def predict(self, context: PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        images = check_images(model_input)
        with torch.inference_mode():
            return self.module(torch.from_numpy(images)).numpy()


mlflow.models.set_model(FashionMNISTClassifier())
