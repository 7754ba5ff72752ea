"""Intensity normalisation, the one place for it: heatmaps, similarity measures, MIND and learned
methods use these (numpy for reports, torch for the optimisers). DINO's own input mapping (CT
window, natural-image range) builds on them in ``features/dino/intensity.py``."""

from __future__ import annotations

import numpy as np
import torch

from dinoreg.errors import InputError


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


def robust_normalise(image: torch.Tensor, mask: torch.Tensor | None = None, low_percent: float = 0.5,
                     high_percent: float = 99.5) -> torch.Tensor:
    """Clip intensities to robust percentiles of the foreground and scale them to [0, 1].

    The foreground is ``mask`` when given, else every voxel above the image minimum (so padding and
    skull-stripped background do not drag the percentiles down). Percentiles are in percent.
    Estimated on at most ~2 million voxels (a regular subsample) to stay fast on large volumes.
    """
    if not 0.0 <= low_percent < high_percent <= 100.0:
        raise InputError(f"intensity percentiles must satisfy 0 <= low < high <= 100 (got {low_percent}, {high_percent})")
    region = None
    if mask is not None and bool((mask > 0.5).any()):
        region = (mask > 0.5).cpu().numpy()
    low, high = robust_range(image.detach().float().cpu().numpy(), region, low_percent, high_percent)
    return ((image.float() - float(low)) / float(high - low)).clamp_(0.0, 1.0)
