"""Evaluation artifacts for people: a confusion-matrix image and a per-class table."""

from collections.abc import Sequence

import matplotlib
import torch
from matplotlib.figure import Figure

matplotlib.use("Agg")  # the trainer container has no display
import matplotlib.pyplot as plt  # noqa: E402


def confusion_figure(confusion: torch.Tensor, classes: Sequence[str], title: str) -> Figure:
    """Counts with rows = true class and columns = predicted class, row-normalised colour."""
    counts = confusion.numpy()
    totals = counts.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    ax.imshow(counts / totals, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            share = counts[i, j] / totals[i, 0]
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share > 0.5 else "black")
    fig.tight_layout()
    return fig


def per_class_table(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, list]:
    """Columns for mlflow.log_table: class, images, correct, accuracy."""
    totals = confusion.sum(dim=1).tolist()
    correct = confusion.diagonal().tolist()
    return {
        "class": list(classes),
        "images": totals,
        "correct": correct,
        "accuracy": [round(c / t, 4) if t else None for c, t in zip(correct, totals)],
    }
