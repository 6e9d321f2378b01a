"""The model the serving container loads: TorchScript weights inside an MLflow pyfunc.

The trained network is wrapped with its input standardisation and a softmax, scripted
and frozen (batch norm folds into the convolutions), checked against the network it came
from, and logged with served_model.py as its code, a signature, a few real test images
as the input example, and pip requirements pinned to what is installed here.

The model directory is written here, signed here (model_signatures: provenance.json and
model.sig over every file), and only then uploaded, so the signature covers exactly the
files this process wrote (model_signatures.log_signed_model).
"""

import copy
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from torch import nn

import model_signatures
from trainer import data

SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")
ARTIFACT_PATH = "model"
EXAMPLE_IMAGES = 3
# The serving image runs the same packages; local build labels such as +cu132 are
# dropped because package indexes do not serve them by that name.
REQUIREMENTS = ("mlflow", "torch", "numpy")


class ServedNetwork(nn.Module):
    """[N, 1, 28, 28] intensities in [0, 1] -> [N, 10] class probabilities: the trained
    network with the standardisation of data.standardise in front and a softmax behind."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.mean = data.MEAN
        self.std = data.STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((x - self.mean) / self.std).float(), dim=1)


def to_torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
    net.eval()
    with warnings.catch_warnings():
        # torch 2.15 marks TorchScript deprecated in favour of torch.export; the serving
        # contract is TorchScript because it loads with torch alone, and it still works.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        return torch.jit.freeze(torch.jit.script(ServedNetwork(net).eval()))


def pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def example_images(test_split: data.Split) -> np.ndarray:
    return (test_split.images[:EXAMPLE_IMAGES].unsqueeze(1).float() / 255.0).cpu().numpy()


def log_served_model(model: nn.Module, test_split: data.Split, arch: str, registered_model: str,
                     key: model_signatures.PrivateKey) -> str:
    """Log the served model, signed for registered_model, to the active run; return its URI."""
    scripted = to_torchscript(model)
    example = example_images(test_split)
    with torch.inference_mode():
        probabilities = scripted(torch.from_numpy(example)).numpy()
        reference_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
        reference_input = data.standardise(test_split.images[:EXAMPLE_IMAGES].cpu())
        reference = torch.softmax(reference_model(reference_input), 1).numpy()
    # Freezing and scripting must not change what the model says.
    if not np.allclose(probabilities, reference, atol=1e-4):
        raise RuntimeError("the TorchScript export disagrees with the trained model")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.pt"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            torch.jit.save(scripted, str(weights))

        def save(path: str, mlflow_model: mlflow.models.Model) -> None:
            mlflow.pyfunc.save_model(
                path,
                mlflow_model=mlflow_model,
                python_model=str(SERVED_MODEL_CODE),
                artifacts={"torchscript": str(weights)},
                signature=infer_signature(example, probabilities),
                input_example=example,
                pip_requirements=pip_requirements(),
                metadata={"classes": list(data.CLASSES), "architecture": arch,
                          "input": "float32 [N, 1, 28, 28], pixel intensities in [0, 1]",
                          "output": "float32 [N, 10], softmax probabilities in class order"},
            )

        return model_signatures.log_signed_model(save, ARTIFACT_PATH, registered_model, key)
