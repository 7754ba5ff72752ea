"""The comparison benchmark's one scorer (benchmarks/scorer.py) against hand-computed values."""

from __future__ import annotations

import sys

import numpy as np
import SimpleITK as sitk

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import scorer  # noqa: E402


def image(array: np.ndarray, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    result = sitk.GetImageFromArray(array)
    result.SetDirection(direction)
    result.SetSpacing(spacing)
    return result


def test_dice_and_hd95_of_a_known_shift():
    """Two 10-voxel-wide slabs; the transform shifts by 2 mm: Dice 8/10, HD95 2 mm."""
    fixed = np.zeros((20, 20, 20), np.int16)
    fixed[:, :, 5:15] = 1
    translation = sitk.TranslationTransform(3, (2.0, 0.0, 0.0))  # fixed point x -> moving point x + 2
    scores = scorer.label_scores(image(fixed), image(fixed), translation, [1])
    assert abs(scores["dice_per_label"]["1"] - 0.8) < 1e-9
    assert abs(scores["hd95_per_label_mm"]["1"] - 2.0) < 1e-9


def test_jacobian_of_an_affine_on_an_lia_grid_and_of_a_sine_field():
    """J = det(A) everywhere for an affine (SDlogJ 0), whatever the grid direction; a known field's J."""
    reference = image(np.zeros((24, 22, 20), np.float32), direction=(1, 0, 0, 0, 0, -1, 0, -1, 0), spacing=(1, 1.5, 2))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.1, 0.1, 0, 0, 0.9, 0.05, 0.02, 0, 1.2))
    stats = scorer.jacobian_stats(scorer.point_map_field(affine, reference))
    assert stats["sdlogj"] < 1e-6 and stats["percent_nonpositive_jacobian"] == 0.0
    # u_x = -2 * i mm along the first grid axis (x): J = 1 + du_x/dx = 1 - 2 = -1 (folded) everywhere
    displacement = np.zeros((24, 22, 20, 3))
    displacement[..., 0] = -2.0 * np.arange(20)[None, None, :]
    field = sitk.GetImageFromArray(displacement, isVector=True)
    field.CopyInformation(reference)
    assert scorer.jacobian_stats(field)["percent_nonpositive_jacobian"] == 100.0


def test_tre_of_a_translation():
    points = np.array([[0.0, 0.0, 0.0], [10.0, 5.0, -3.0]])
    result = scorer.landmark_tre(sitk.TranslationTransform(3, (3.0, 4.0, 0.0)), points, points)
    assert abs(result["tre_mean_mm"] - 5.0) < 1e-9 and abs(result["tre_max_mm"] - 5.0) < 1e-9


def test_scorer_imports_nothing_from_the_methods():
    text = (REPO / "benchmarks" / "scorer.py").read_text()
    assert "dinoreg" not in text and "ants" not in text.split('"""', 2)[2] and "fireants" not in text
