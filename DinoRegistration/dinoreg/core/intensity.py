"""Intensity normalisation shared by heatmaps, similarity measures and feature backends."""

from __future__ import annotations

import numpy as np


def foreground(array: np.ndarray) -> np.ndarray:
    """Boolean mask of voxels above the lowest intensity (background of MR/skull-stripped images)."""
    return array > array.min()


def robust_range(array: np.ndarray, mask: np.ndarray | None = None, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """Percentiles (``low``, ``high`` in %) of the foreground voxels (or of ``mask``)."""
    region = mask if mask is not None else foreground(array)
    values = array[region] if region.any() else array.ravel()
    if values.size > 2_000_000:
        values = values[:: values.size // 2_000_000]
    lo, hi = np.percentile(values.astype(np.float64), [low, high])
    if hi <= lo:
        lo, hi = float(array.min()), float(array.max())
    return float(lo), float(max(hi, lo + 1e-6))


def normalise(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Clip to ``value_range`` and scale to [0, 1], float32."""
    lo, hi = value_range
    return np.clip((array.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
