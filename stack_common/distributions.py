"""How the trainer's reference statistics and the drift report measure a distribution, in
one place so that both sides count alike: the pixel-intensity bins, and the distances
between two histograms.
"""

from __future__ import annotations

import numpy as np

# Pixel values in [0, 1], as the endpoint takes them, in 20 equal bins; values outside
# are counted in the end bins.
INTENSITY_EDGES = np.linspace(0.0, 1.0, 21)
# Empty bins would make the population stability index infinite; each share is floored here.
SHARE_FLOOR = 1e-4


def intensity_counts(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Counts of pixel values per bin of INTENSITY_EDGES."""
    clipped = np.clip(np.asarray(values, dtype=np.float64).ravel(), 0.0, 1.0)
    counts, _ = np.histogram(clipped, bins=INTENSITY_EDGES, weights=weights)
    return counts.astype(np.int64)


def shares(counts: np.ndarray | list[int]) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.full(len(counts), 1.0 / len(counts))


def psi(reference: np.ndarray | list[int], observed: np.ndarray | list[int]) -> float:
    """Population stability index of observed against reference counts (0: the same; above
    0.2 is commonly read as a significant shift)."""
    p = np.maximum(shares(reference), SHARE_FLOOR)
    q = np.maximum(shares(observed), SHARE_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def total_variation(reference: np.ndarray | list[int], observed: np.ndarray | list[int]) -> float:
    """Half the L1 distance between the two distributions: 0 the same, 1 disjoint."""
    return float(0.5 * np.abs(shares(reference) - shares(observed)).sum())


def chi_square(reference: np.ndarray | list[int], observed: np.ndarray | list[int]) -> tuple[float, float]:
    """Pearson's statistic of observed counts against the reference's shares, and its p-value."""
    from scipy.stats import chi2

    observed = np.asarray(observed, dtype=np.float64)
    expected = np.maximum(shares(reference), SHARE_FLOOR) * observed.sum()
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    return statistic, float(chi2.sf(statistic, len(observed) - 1))
