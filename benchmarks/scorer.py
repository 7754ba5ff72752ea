"""The ONE scorer of the comparison benchmark: reads an ITK transform file, returns every metric.

It imports nothing from DinoRegistration or any method: SimpleITK reads the transform (fixed ->
moving points, LPS mm, as ITK resamples), and numpy/scipy compute the numbers, so every method is
scored by the same code from the file it exported.

- Dice per label (moving labels resampled through the transform onto the fixed grid, nearest
  neighbour) and their mean over ``labels``;
- HD95 (mm): 95th percentile of the symmetric surface distance per label, mean over labels with
  both masks non-empty;
- SDlogJ and % J <= 0: Jacobian determinant of the point map x -> T(x) on the fixed grid (central
  differences of T(x) - x in physical mm), 2-voxel border cropped, J clipped to 1e-9 for the log.
  The affine part of T only shifts log J by a constant;
- TRE (mm): mean |T(p_fixed) - p_moving| over landmark pairs when landmarks are given;
- NCC between the fixed image and the moving image resampled through T (linear), over the fixed
  image's foreground (above its 10th percentile of non-zero voxels), for pairs without labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

BORDER = 2
#: bump when a metric changes: cached results of compare.py are then re-scored from their transforms
VERSION = 2


def read_transform(path: str) -> sitk.Transform:
    """An ITK transform file (.h5, .tfm, .txt) as one SimpleITK transform."""
    return sitk.ReadTransform(str(path))


def point_map_field(transform: sitk.Transform, fixed: sitk.Image) -> sitk.Image:
    """Displacement T(x) - x on the fixed grid (vector image, LPS mm)."""
    converter = sitk.TransformToDisplacementFieldFilter()
    converter.SetReferenceImage(fixed)
    converter.SetOutputPixelType(sitk.sitkVectorFloat64)
    return converter.Execute(transform)


def jacobian_stats(field: sitk.Image) -> dict[str, float]:
    """SDlogJ and percent of voxels with J <= 0 of x -> x + u(x) (border cropped).

    Computed here, not with ITK's DisplacementFieldJacobianDeterminant, which differentiates along
    the index axes and ignores the image direction (wrong for LIA or oblique grids):
    du/dx = du/d(index * spacing) @ direction^T.
    """
    displacement = sitk.GetArrayFromImage(field).astype(np.float32)  # (k, j, i, 3)
    spacing = np.array(field.GetSpacing())
    direction = np.array(field.GetDirection()).reshape(3, 3)
    # gradient along i, j, k (array axes 2, 1, 0) in mm: shape (k, j, i, 3 components, 3 axes)
    gradient = np.stack([np.gradient(displacement, spacing[axis], axis=2 - axis) for axis in range(3)], axis=-1)
    jacobian_matrix = np.eye(3, dtype=np.float32) + gradient @ direction.T.astype(np.float32)
    jacobian = np.linalg.det(jacobian_matrix)
    if min(jacobian.shape) > 2 * BORDER:
        jacobian = jacobian[BORDER:-BORDER, BORDER:-BORDER, BORDER:-BORDER]
    log_j = np.log(np.clip(jacobian.astype(np.float64), 1e-9, None))
    return {"sdlogj": float(log_j.std()), "percent_nonpositive_jacobian": float(100.0 * (jacobian <= 0).mean())}


def surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing_kji: tuple[float, ...]) -> float:
    """95th percentile symmetric surface distance in mm (computed on the masks' joint bounding box)."""
    if not a.any() or not b.any():
        return float("nan")
    box = ndimage.find_objects((a | b).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(box, a.shape))
    a, b = a[box], b[box]
    surface_a, surface_b = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing_kji)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing_kji)
    return float(max(np.percentile(to_b[surface_a], 95), np.percentile(to_a[surface_b], 95)))


def label_scores(fixed_labels: sitk.Image, moving_labels: sitk.Image, transform: sitk.Transform,
                 labels: list[int], with_hd95: bool = True) -> dict[str, Any]:
    """Dice and HD95 per label of the fixed labels vs the moving labels warped onto the fixed grid."""
    warped = sitk.Resample(moving_labels, fixed_labels, transform, sitk.sitkNearestNeighbor, 0, moving_labels.GetPixelID())
    fixed_array, warped_array = sitk.GetArrayFromImage(fixed_labels), sitk.GetArrayFromImage(warped)
    spacing_kji = tuple(fixed_labels.GetSpacing()[::-1])
    dice, distance = {}, {}
    for label in labels:
        a, b = fixed_array == label, warped_array == label
        total = int(a.sum()) + int(b.sum())
        if total == 0:
            continue
        dice[label] = 2.0 * int((a & b).sum()) / total
        if with_hd95:
            distance[label] = hd95(a, b, spacing_kji)
    finite = [v for v in distance.values() if np.isfinite(v)]
    return {"dice_mean": float(np.mean(list(dice.values()))) if dice else None,
            "hd95_mean_mm": float(np.mean(finite)) if finite else None,
            "dice_per_label": {str(k): v for k, v in dice.items()},
            "hd95_per_label_mm": {str(k): v for k, v in distance.items()}}


def ncc_after(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    warped = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, transform,
                                                  sitk.sitkLinear, 0.0, sitk.sitkFloat32)).astype(np.float64)
    reference = sitk.GetArrayFromImage(fixed).astype(np.float64)
    nonzero = reference[reference > 0]
    mask = reference > (np.percentile(nonzero, 10) if nonzero.size else 0)
    x, y = reference[mask] - reference[mask].mean(), warped[mask] - warped[mask].mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def landmark_tre(transform: sitk.Transform, fixed_points: np.ndarray, moving_points: np.ndarray) -> dict[str, float]:
    """Mean and max |T(fixed point) - moving point| in mm; points (N, 3) LPS mm."""
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in fixed_points])
    error = np.linalg.norm(mapped - np.asarray(moving_points), axis=1)
    return {"tre_mean_mm": float(error.mean()), "tre_max_mm": float(error.max())}


def score(transform_path: str, fixed_image: str, moving_image: str, fixed_labels: str | None = None,
          moving_labels: str | None = None, labels: list[int] | None = None,
          fixed_points: np.ndarray | None = None, moving_points: np.ndarray | None = None) -> dict[str, Any]:
    """Every metric of one exported transform (file paths; labels None = every label in both maps)."""
    transform = read_transform(transform_path)
    fixed = sitk.ReadImage(str(fixed_image))
    result: dict[str, Any] = {"ncc": ncc_after(fixed, sitk.ReadImage(str(moving_image)), transform)}
    result.update(jacobian_stats(point_map_field(transform, fixed)))
    if fixed_labels and moving_labels:
        fixed_map, moving_map = sitk.ReadImage(str(fixed_labels)), sitk.ReadImage(str(moving_labels))
        if labels is None:
            labels = sorted(set(np.unique(sitk.GetArrayViewFromImage(fixed_map)).tolist())
                            & set(np.unique(sitk.GetArrayViewFromImage(moving_map)).tolist()) - {0})
        result.update(label_scores(fixed_map, moving_map, transform, labels))
    if fixed_points is not None and moving_points is not None:
        result.update(landmark_tre(transform, fixed_points, moving_points))
    return result
