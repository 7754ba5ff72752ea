"""``dinoreg evaluate``: metrics of a finished registration read from its files."""

from __future__ import annotations

from typing import Any

import numpy as np

from dinoreg.errors import InputError
from dinoreg.io.landmarks import read_landmarks
from dinoreg.report import metrics


def evaluate_outputs(fixed_labels: str | None, warped_labels: str | None, label_list: str | None,
                     jacobian: str | None, transform: str | None, fixed_landmarks: str | None,
                     moving_landmarks: str | None) -> dict[str, Any]:
    """Evaluate whatever was given; returns a flat dict (plus per-label dicts)."""
    from dinoreg.io.volumes import read_label_volume, read_volume  # lazy: imports SimpleITK

    results: dict[str, Any] = {}
    if fixed_labels or warped_labels:
        if not (fixed_labels and warped_labels):
            raise InputError("label evaluation needs both --fixed-labels and --warped-labels")
        fixed = read_volume(fixed_labels, "fixed label map", is_image=False)
        warped = read_label_volume(warped_labels, fixed, "warped label map")
        fixed_array = np.round(fixed.array).astype(np.int32)
        labels = [int(v) for v in label_list.split(",")] if label_list else None
        dice = metrics.dice_per_label(fixed_array, warped.array, labels)
        hd = metrics.hd95_per_label(fixed_array, warped.array, tuple(fixed.grid.spacing[::-1]), list(dice))
        results.update(dice_mean=float(np.mean(list(dice.values()))) if dice else float("nan"),
                       hd95_mean_mm=float(np.mean([v for v in hd.values() if np.isfinite(v)])) if hd else float("nan"),
                       labels_evaluated=len(dice), dice_per_label=dice, hd95_per_label_mm=hd)
    if jacobian:
        jac = read_volume(jacobian, "Jacobian map", is_image=False).array
        results.update(sdlogj=metrics.sdlogj(jac), percent_nonpositive_jacobian=metrics.folding_percent(jac))
    if transform or fixed_landmarks or moving_landmarks:
        results.update(landmark_results(transform, fixed_landmarks, moving_landmarks))
    return results


def landmark_results(transform: str | None, fixed_landmarks: str | None, moving_landmarks: str | None) -> dict[str, Any]:
    import torch  # lazy: torch is not needed to start this command

    from dinoreg.io.itk_files import read_transform  # lazy: imports SimpleITK, torch

    if not (transform and fixed_landmarks and moving_landmarks):
        raise InputError("landmark TRE needs --transform, --fixed-landmarks and --moving-landmarks")
    fixed_points, moving_points = read_landmarks(fixed_landmarks), read_landmarks(moving_landmarks)
    if fixed_points.shape != moving_points.shape:
        raise InputError(f"{len(fixed_points)} fixed but {len(moving_points)} moving landmarks: the lists must correspond")
    mapped = read_transform(transform).apply(torch.tensor(fixed_points, dtype=torch.float32).reshape(1, 1, -1, 3))
    before = metrics.landmark_tre(fixed_points, moving_points)
    after = metrics.landmark_tre(mapped.reshape(-1, 3).numpy(), moving_points)
    return {"tre_mean_mm_before": float(before.mean()), "tre_mean_mm": float(after.mean()),
            "tre_max_mm": float(after.max()), "landmarks": int(len(after))}
