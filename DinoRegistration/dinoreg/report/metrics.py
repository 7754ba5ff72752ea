"""Registration quality measures, as Learn2Reg computes them.

- Dice per label (overlap of fixed labels and warped moving labels);
- HD95: 95th percentile of the symmetric surface distance, in mm (the larger of the two directed
  95th percentiles, as DeepMind's surface-distance package used by Learn2Reg);
- SDlogJ: standard deviation of log(J), J clipped to 1e-9, a 2-voxel border cropped;
- folding: percent of voxels with J <= 0 (same crop);
- TRE: Euclidean distance in mm between mapped fixed landmarks and moving landmarks;
- image similarity: normalised cross-correlation and normalised mutual information.
"""

from __future__ import annotations

import numpy as np


def dice_per_label(fixed_labels: np.ndarray, warped_labels: np.ndarray, labels: list[int] | None = None) -> dict[int, float]:
    """Dice of each label present in both maps (or of the given ``labels``; absent in both -> skipped)."""
    if labels is None:
        labels = sorted(set(np.unique(fixed_labels)) & set(np.unique(warped_labels)) - {0})
    scores: dict[int, float] = {}
    for label in labels:
        a, b = fixed_labels == label, warped_labels == label
        total = int(a.sum()) + int(b.sum())
        if total:
            scores[int(label)] = 2.0 * int((a & b).sum()) / total
    return scores


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it."""
    from scipy import ndimage  # lazy: surface distances only (importing scipy.ndimage costs ~0.2 s per registration)

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(mask_a: np.ndarray, mask_b: np.ndarray, spacing_kji: tuple[float, float, float]) -> float:
    """95th-percentile Hausdorff distance in mm between two binary masks on one grid.

    ``spacing_kji`` is the voxel size along the array axes [k, j, i] (i.e. reversed ITK spacing).
    Returns inf when one mask is empty and the other is not, 0 when both are empty.
    """
    if not mask_a.any() and not mask_b.any():
        return 0.0
    if not mask_a.any() or not mask_b.any():
        return float("inf")
    from scipy import ndimage  # lazy, as in surface()

    surface_a, surface_b = surface(mask_a), surface(mask_b)
    distance_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing_kji)
    distance_to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing_kji)
    return float(max(np.percentile(distance_to_b[surface_a], 95), np.percentile(distance_to_a[surface_b], 95)))


def hd95_per_label(fixed_labels: np.ndarray, warped_labels: np.ndarray, spacing_kji: tuple[float, float, float],
                   labels: list[int]) -> dict[int, float]:
    return {int(label): hd95(fixed_labels == label, warped_labels == label, spacing_kji) for label in labels}


def crop_border(array: np.ndarray, border: int = 2) -> np.ndarray:
    if min(array.shape) <= 2 * border:
        return array
    return array[border:-border, border:-border, border:-border]


def sdlogj(jacobian: np.ndarray, border: int = 2, slab: int = 8) -> float:
    """Standard deviation of log(J) with J clipped to 1e-9, ``border`` voxels cropped (float64).

    Computed ``slab`` slices at a time (each slab's mean and sum of squared deviations, merged
    exactly by Chan's formula): the same value as ``np.log(values).std()`` to float64 rounding,
    without three whole-volume float64 temporaries (168 MB for a 1 mm brain, most of this
    metric's time in a registration process).
    """
    values = crop_border(jacobian, border)
    count, mean, squares = 0, 0.0, 0.0
    for k0 in range(0, values.shape[0], slab):
        logs = np.log(np.clip(values[k0:k0 + slab], 1e-9, None).astype(np.float64))
        n, slab_mean = logs.size, float(logs.mean())
        slab_squares = float(np.square(logs - slab_mean).sum())
        delta = slab_mean - mean
        squares += slab_squares + delta * delta * count * n / (count + n)
        mean += delta * n / (count + n)
        count += n
    return float(np.sqrt(squares / count)) if count else float("nan")


def folding_percent(jacobian: np.ndarray, border: int = 2) -> float:
    """Percent of voxels with J <= 0 (``border`` voxels cropped)."""
    cropped = crop_border(jacobian, border)
    return float(100.0 * (cropped <= 0).sum() / cropped.size)


def landmark_tre(mapped_fixed_points: np.ndarray, moving_points: np.ndarray) -> np.ndarray:
    """Per-landmark error in mm: |T(fixed landmark) - moving landmark| (both (N, 3) LPS mm)."""
    return np.linalg.norm(np.asarray(mapped_fixed_points) - np.asarray(moving_points), axis=1)


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Global normalised cross-correlation in [-1, 1] over ``mask`` (or every voxel)."""
    x = a[mask] if mask is not None else a.ravel()
    y = b[mask] if mask is not None else b.ravel()
    x = x.astype(np.float64) - x.mean()
    y = y.astype(np.float64) - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def nmi(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 32) -> float:
    """Normalised mutual information (H(A) + H(B)) / H(A, B), in [1, 2]; images in [0, 1]."""
    x = a[mask] if mask is not None else a.ravel()
    y = b[mask] if mask is not None else b.ravel()
    # np.histogram2d's bins of [0, 1] (the last one closed) by one bincount: ~10x faster on millions of voxels
    inside = (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
    bin_x = np.minimum((x[inside] * bins).astype(np.int64), bins - 1)
    bin_y = np.minimum((y[inside] * bins).astype(np.int64), bins - 1)
    joint = np.bincount(bin_x * bins + bin_y, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    joint = joint / max(joint.sum(), 1)

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    joint_entropy = entropy(joint.ravel())
    return (entropy(joint.sum(0)) + entropy(joint.sum(1))) / joint_entropy if joint_entropy > 0 else 1.0
