"""Landmark files and the landmark check (target registration error, TRE).

Formats: ``.csv`` with columns x, y, z in LPS (ITK convention; an optional header row and a leading
label column are allowed), Slicer ``.fcsv`` and ``.mrk.json`` (their coordinate system is read from
the file; an .fcsv without it is LPS, like Slicer's storage node reads it; .mrk.json defaults to LPS), and converted: LPS = diag(-1, -1, 1) RAS). Points are (N, 3) arrays of mm.

The check pairs points placed on the fixed and on the moving image by label (when every point of
both lists has a distinct label and at least one label is shared) or else by order, and reports the
distance of each pair before registration and after (moving points mapped onto the fixed image).
Only numpy: the Slicer panel uses the same pairing and summary on its markups.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dinoreg.errors import InputError

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def read_landmarks(path: str | Path) -> np.ndarray:
    """(N, 3) LPS mm points of a landmark file."""
    return read_labelled_landmarks(path)[1]


def read_labelled_landmarks(path: str | Path) -> Tuple[List[str], np.ndarray]:
    """(labels, (N, 3) LPS mm points) of a landmark file; labels are '' where the file has none."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file '{path}' does not exist: check the path")
    name = path.name.lower()
    if name.endswith(".mrk.json"):
        return read_markups_json(path)
    if name.endswith(".fcsv"):
        return read_fcsv(path)
    return read_csv(path)


def read_csv(path: Path) -> Tuple[List[str], np.ndarray]:
    labels, rows = [], []
    with path.open(newline="") as handle:
        for row in csv.reader(handle):
            numbers = []
            for cell in row[-3:]:
                try:
                    numbers.append(float(cell))
                except ValueError:
                    break
            if len(numbers) == 3:
                rows.append(numbers)
                labels.append(row[0].strip() if len(row) > 3 else "")
    if not rows:
        raise InputError(f"landmark file '{path}' has no x,y,z rows: write one point per line as x,y,z (LPS mm)")
    return labels, np.array(rows)


def read_fcsv(path: Path) -> Tuple[List[str], np.ndarray]:
    """Slicer's fiducial CSV: ``id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID``.

    Frame as Slicer's storage node reads it: the ``# CoordinateSystem`` line if any; else LPS (the storage
    node's default) for a versioned file (``# Markups fiducial file version``), RAS for an unversioned one
    (read as Slicer 3 format). Checked with slicer-core 5.13's vtkMRMLMarkupsFiducialStorageNode."""
    system = "RAS"
    labels, rows = [], []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            if "file version" in line.lower() and "CoordinateSystem" not in line:
                system = "LPS"
            if "CoordinateSystem" in line:
                value = line.split("=")[-1].strip().upper()
                system = "LPS" if value in ("LPS", "1") else "RAS"
            continue
        cells = line.split(",")
        if len(cells) >= 4:
            try:
                rows.append([float(c) for c in cells[1:4]])
            except ValueError:
                raise InputError(f"landmark file '{path}' has a point with a non-numeric coordinate: "
                                 "export the markups from Slicer again") from None
            labels.append(cells[11].strip() if len(cells) > 11 else "")
    if not rows:
        raise InputError(f"landmark file '{path}' has no points: export the markups from Slicer again")
    points = np.array(rows)
    return labels, (points * RAS_TO_LPS if system == "RAS" else points)


def read_markups_json(path: Path) -> Tuple[List[str], np.ndarray]:
    try:
        markups = json.loads(path.read_text())["markups"][0]
        control = markups["controlPoints"]
        points = np.array([p["position"] for p in control], dtype=np.float64).reshape(-1, 3)
        labels = [str(p.get("label", "")) for p in control]
    except (KeyError, IndexError, ValueError, TypeError):
        raise InputError(f"landmark file '{path}' is not a Slicer markups JSON with control points") from None
    if not len(points):
        raise InputError(f"landmark file '{path}' has no points: place some and save it again")
    return labels, (points if markups.get("coordinateSystem", "LPS").upper() == "LPS" else points * RAS_TO_LPS)


def pair_landmarks(fixed_labels: Sequence[str], moving_labels: Sequence[str]) -> Tuple[List[Tuple[int, int]], str]:
    """Index pairs (fixed i, moving j) of corresponding points, and how they were matched ("label" or "order").

    By label when all labels are non-empty and distinct in both lists and at least one is shared (pairs in
    the fixed list's order; unmatched points are left out); otherwise by order, which needs equal counts.
    """
    def usable(labels: Sequence[str]) -> bool:
        return all(labels) and len(set(labels)) == len(labels)

    if usable(fixed_labels) and usable(moving_labels):
        moving_index = {label: j for j, label in enumerate(moving_labels)}
        pairs = [(i, moving_index[label]) for i, label in enumerate(fixed_labels) if label in moving_index]
        if pairs:
            return pairs, "label"
    if len(fixed_labels) != len(moving_labels):
        raise InputError(f"{len(fixed_labels)} fixed but {len(moving_labels)} moving landmarks and no common labels: "
                         "place the same points on both images (same labels, or the same order)")
    if not len(fixed_labels):
        raise InputError("no landmarks: place at least one point on each image")
    return [(i, i) for i in range(len(fixed_labels))], "order"


def landmark_summary(labels: Sequence[str], fixed_points: np.ndarray, moving_points: np.ndarray,
                     moving_mapped: np.ndarray, matched_by: str, worst: int = 3) -> Dict[str, Any]:
    """Per-point and mean distances (mm) between paired points, before registration (|moving - fixed|)
    and after (|moving mapped onto the fixed image - fixed|); the ``worst`` points after, worst first.

    All arrays (N, 3) in one frame (LPS or RAS: distances do not depend on it)."""
    fixed_points, moving_points, moving_mapped = (np.asarray(a, dtype=np.float64).reshape(-1, 3)
                                                  for a in (fixed_points, moving_points, moving_mapped))
    before = np.linalg.norm(moving_points - fixed_points, axis=1)
    after = np.linalg.norm(moving_mapped - fixed_points, axis=1)
    points = [{"label": str(label), "before_mm": float(b), "after_mm": float(a)}
              for label, b, a in zip(labels, before, after)]
    order = [int(i) for i in np.argsort(-after, kind="stable")]
    return {"count": int(len(points)), "matched_by": matched_by,
            "mean_before_mm": float(before.mean()), "mean_after_mm": float(after.mean()),
            "max_before_mm": float(before.max()), "max_after_mm": float(after.max()),
            "worst": order[:worst], "points": points}


def landmark_check(fixed: Tuple[Sequence[str], np.ndarray], moving: Tuple[Sequence[str], np.ndarray],
                   map_moving_to_fixed: Any, direction: Optional[str] = None) -> Dict[str, Any]:
    """Pair ``fixed`` and ``moving`` (labels, points), map the paired moving points with
    ``map_moving_to_fixed((N, 3) array) -> (N, 3) array`` and summarise (see :func:`landmark_summary`)."""
    pairs, matched_by = pair_landmarks(list(fixed[0]), list(moving[0]))
    fixed_index, moving_index = [i for i, _ in pairs], [j for _, j in pairs]
    fixed_points = np.asarray(fixed[1], dtype=np.float64)[fixed_index]
    moving_points = np.asarray(moving[1], dtype=np.float64)[moving_index]
    labels = [fixed[0][i] or moving[0][j] or str(n + 1) for n, (i, j) in enumerate(pairs)]
    summary = landmark_summary(labels, fixed_points, moving_points, map_moving_to_fixed(moving_points), matched_by)
    if direction:
        summary["direction"] = direction
    return summary
