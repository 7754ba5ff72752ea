"""The Check section: distances between points placed on the fixed and on the moving image, before and
after registration, from two markups point lists and the registration's transform node.

Points are read in world RAS mm. The transform node holds FIXED -> MOVING as "FromParent"; moving points
are mapped onto the fixed image by the engine's inverse field (the inverse transform node, MOVING -> FIXED as
"FromParent") when the run computed it, else by the transform's "ToParent" (Slicer's numerical inverse). Pairing and the summary are the engine's (``dinoreg.io.landmarks``), so the panel
and ``dinoreg register --fixed-landmarks/--moving-landmarks`` report the same numbers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

from DinoRegistrationLib.job import RegistrationError

POSITION_DEFINED = 2  # vtkMRMLMarkupsNode::PositionDefined (Slicer 5.x)


def markupsPoints(node: Any, local: bool = False) -> Tuple[List[str], np.ndarray]:
    """(labels, (N, 3) RAS mm) of the placed control points of a markups node: world coordinates, or the
    node's own coordinates (before its parent transform) with ``local=True``."""
    labels, points = [], []
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) != POSITION_DEFINED:
            continue  # being placed, or skipped: no position yet
        position = [0.0, 0.0, 0.0]
        if local:
            node.GetNthControlPointPosition(index, position)
        else:
            node.GetNthControlPointPositionWorld(index, position)
        labels.append(node.GetNthControlPointLabel(index))
        points.append(position)
    return labels, np.array(points, dtype=np.float64).reshape(-1, 3)


def checkLandmarks(fixedPoints: Any, movingPoints: Any, transform: Any, inverseTransform: Any = None) -> Dict[str, Any]:
    """Distances (mm) per point pair and on average, before and after registration; the worst pairs first
    in ``worst``. See ``dinoreg.io.landmarks.landmark_summary`` for the keys; ``direction`` says which inverse
    mapped the moving points.

    ``transform``: the registration's transform node (FIXED -> MOVING as FromParent). ``inverseTransform``: the
    node of the engine's inverse_transform.h5 (MOVING -> FIXED as FromParent), when the run computed it: moving
    points are mapped by it, the same field ``dinoreg register --fixed-landmarks/--moving-landmarks`` uses, so the
    panel and the CLI agree. Without it, by Slicer's inverse of ``transform`` (VTK inverts the grid numerically
    per point: it can differ from the engine's field by a fraction of a mm where the field is large).
    Points on the moving image are taken where they were placed: if their list was put under ``transform`` to
    see them follow the warp, their own (untransformed) coordinates are used.
    """
    from dinoreg.errors import InputError
    from dinoreg.io.landmarks import landmark_check

    if fixedPoints is None or movingPoints is None:
        raise RegistrationError("Select the points placed on the fixed image and those placed on the moving image.")
    if transform is None or transform.GetTransformToParent() is None:
        raise RegistrationError("Register first (or select the registration's transform) to check landmarks.")
    fixed = markupsPoints(fixedPoints)
    moving = markupsPoints(movingPoints, local=movingPoints.GetParentTransformNode() is transform)
    if inverseTransform is not None and inverseTransform.GetTransformFromParent() is not None:
        toFixed = inverseTransform.GetTransformFromParent()  # the engine's moving -> fixed field
        direction = "moving points mapped to fixed by the engine's inverse field (inverse_transform.h5); RAS mm"
    else:
        toFixed = transform.GetTransformToParent()  # VTK's numerical inverse of fixed -> moving
        direction = "moving points mapped to fixed by Slicer's numerical inverse of the transform; RAS mm"

    def movingToFixed(points: np.ndarray) -> np.ndarray:
        with linearInterpolation(toFixed):
            return np.array([toFixed.TransformPoint(*point) for point in points], dtype=np.float64).reshape(-1, 3)

    try:
        return landmark_check(fixed, moving, movingToFixed, direction)
    except InputError as error:
        raise RegistrationError(str(error)) from None


def gridParts(transform: Any) -> List[Any]:
    """The grid (displacement field) transforms inside a VTK transform, general transforms walked through."""
    transform.Update()
    if transform.IsA("vtkGridTransform"):
        return [transform]
    parts = []
    if transform.IsA("vtkGeneralTransform"):
        for index in range(transform.GetNumberOfConcatenatedTransforms()):
            parts += gridParts(transform.GetConcatenatedTransform(index))
    return parts


@contextlib.contextmanager
def linearInterpolation(transform: Any) -> Iterator[None]:
    """Inside the block, ``transform``'s displacement fields interpolate linearly, as ITK and the engine do; their
    mode is restored after. Slicer reads ITK displacement fields with cubic interpolation (v5.6.0 to v5.10.0,
    Libs/MRML/Core/vtkITKTransformConverter.h: ``SetInterpolationModeToCubic``), which moves points up to a few
    hundredths of a mm away from the engine's map (measured in BENCHMARKS.md, 'Landmark check')."""
    parts = gridParts(transform)
    modes = [part.GetInterpolationMode() for part in parts]
    try:
        for part in parts:
            part.SetInterpolationModeToLinear()
        yield
    finally:
        for part, mode in zip(parts, modes):
            part.SetInterpolationMode(mode)


def formatLandmarkSummary(summary: Dict[str, Any]) -> str:
    """One line for the status: 'Landmarks (5, by label): 6.2 mm -> 1.4 mm on average, worst 3.1 mm (P3).'"""
    worst = summary["points"][summary["worst"][0]] if summary.get("worst") else None
    text = (f"Landmarks ({summary['count']}, by {summary['matched_by']}): {summary['mean_before_mm']:.1f} mm -> "
            f"{summary['mean_after_mm']:.1f} mm on average")
    if worst is not None:
        text += f", worst {worst['after_mm']:.1f} mm ({worst['label']})"
    return text + "."
