"""What the training data and the model's answers looked like, logged with every version
so that a drift report can compare what serving sees with it (`python -m tracking.drift`).

On the test split: the class distribution of the labels and of the model's predictions
(the confusion matrix's row and column sums), and a histogram of pixel intensities in
[0, 1] over the fixed bins of stack_common.distributions.
"""

from typing import Any

import numpy as np
import torch

from stack_common.distributions import INTENSITY_EDGES, intensity_counts
from trainer import data

ARTIFACT = "reference/stats.json"
FORMAT = 1


def compute(confusion: torch.Tensor, test_split: data.Split) -> dict[str, Any]:
    """The reference statistics of a version, from its evaluation's confusion matrix (rows:
    true class, columns: predicted) and the test images it was evaluated on."""
    confusion = confusion.cpu()
    # 256 possible uint8 values: count those, then bin their [0, 1] values weighted by count.
    per_value = torch.bincount(test_split.images.flatten().cpu().to(torch.int64), minlength=256).numpy()
    intensity = intensity_counts(np.arange(256) / 255.0, weights=per_value)
    return {
        "format": FORMAT,
        "split": "test",
        "samples": len(test_split),
        "classes": list(data.CLASSES),
        "label_counts": confusion.sum(1).tolist(),
        "prediction_counts": confusion.sum(0).tolist(),
        "intensity_edges": INTENSITY_EDGES.tolist(),
        "intensity_counts": intensity.tolist(),
    }
