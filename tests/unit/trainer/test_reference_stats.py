"""Reference statistics: the class counts come from the confusion matrix, the intensity
histogram from the test images, on the bins the drift report uses."""

import torch

from stack_common.distributions import INTENSITY_EDGES
from trainer import data, reference_stats


def test_counts_follow_the_confusion_matrix_and_the_pixels():
    images = torch.zeros((4, 28, 28), dtype=torch.uint8)
    images[0] = 255  # one white image, three black ones
    split = data.Split(images, torch.tensor([0, 1, 1, 9]))
    confusion = torch.zeros((10, 10), dtype=torch.int64)
    for true, predicted in ((0, 0), (1, 1), (1, 2), (9, 9)):
        confusion[true, predicted] += 1

    stats = reference_stats.compute(confusion, split)

    assert stats["samples"] == 4 and stats["classes"] == list(data.CLASSES)
    assert stats["label_counts"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert stats["prediction_counts"] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert stats["intensity_edges"] == INTENSITY_EDGES.tolist()
    counts = stats["intensity_counts"]
    assert len(counts) == 20 and counts[0] == 3 * 784 and counts[-1] == 784 and sum(counts) == 4 * 784
