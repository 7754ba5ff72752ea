"""Reading landmark files into (N, 3) arrays of LPS millimetres.

Formats: ``.csv`` with columns x, y, z in LPS (ITK convention; an optional header row and extra
leading label column are allowed), Slicer ``.fcsv`` and ``.mrk.json`` (their coordinate system is
read from the file, RAS by default, and converted: LPS = diag(-1, -1, 1) RAS).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .errors import InputError

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def read_landmarks(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file '{path}' does not exist: check the path")
    name = path.name.lower()
    if name.endswith(".mrk.json"):
        return read_markups_json(path)
    if name.endswith(".fcsv"):
        return read_fcsv(path)
    return read_csv(path)


def read_csv(path: Path) -> np.ndarray:
    rows = []
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
    if not rows:
        raise InputError(f"landmark file '{path}' has no x,y,z rows: write one point per line as x,y,z (LPS mm)")
    return np.array(rows)


def read_fcsv(path: Path) -> np.ndarray:
    system = "RAS"
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            if "CoordinateSystem" in line:
                value = line.split("=")[-1].strip().upper()
                system = "LPS" if value in ("LPS", "1") else "RAS"
            continue
        cells = line.split(",")
        if len(cells) >= 4:
            rows.append([float(c) for c in cells[1:4]])
    if not rows:
        raise InputError(f"landmark file '{path}' has no points: export the markups from Slicer again")
    points = np.array(rows)
    return points * RAS_TO_LPS if system == "RAS" else points


def read_markups_json(path: Path) -> np.ndarray:
    try:
        markups = json.loads(path.read_text())["markups"][0]
        points = np.array([p["position"] for p in markups["controlPoints"]], dtype=np.float64)
    except (KeyError, IndexError, ValueError, TypeError):
        raise InputError(f"landmark file '{path}' is not a Slicer markups JSON with control points") from None
    return points if markups.get("coordinateSystem", "LPS").upper() == "LPS" else points * RAS_TO_LPS
