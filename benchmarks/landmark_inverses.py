"""Panel vs CLI landmark distances on a real registration (issue 15): which inverse maps the moving points.

Reads an engine output folder written by ``dinoreg register ... --fixed-landmarks F --moving-landmarks M``
(report.json holds the CLI's check, moving points mapped by the engine's inverse field in torch), loads the
folder into a slicer-core MRML scene as the panel does (``scene.load_registration_outputs``), puts the same
points in markups nodes and runs the panel's check twice: with Slicer's numerical inverse of the transform (VTK,
what the panel used before) and with the engine's inverse transform node (what it uses now). Prints the
per-point distances after registration and the largest differences (mm).

    python benchmarks/landmark_inverses.py OUTDIR FIXED_IMAGE MOVING_IMAGE FIXED_POINTS MOVING_POINTS
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DinoRegistration"))

import slicer  # noqa: E402  (slicer-core)

from DinoRegistrationLib import scene as scene_module  # noqa: E402
from DinoRegistrationLib import landmarks  # noqa: E402
from DinoRegistrationLib.landmarks import checkLandmarks  # noqa: E402
from dinoreg.io.landmarks import read_labelled_landmarks  # noqa: E402

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def markups(scene, name: str, path: str):
    labels, points = read_labelled_landmarks(path)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for label, point in zip(labels, points * LPS_TO_RAS):
        node.SetNthControlPointLabel(node.AddControlPoint(*point), label)
    return node


def compare(outdir: str, fixed_image: str, moving_image: str, fixed_points: str, moving_points: str) -> dict:
    """{'cli': [...], 'vtk_inverse': [...], 'engine_inverse': [...]} distances after (mm), and the max differences."""
    scene = slicer.vtkMRMLScene()
    fixed = scene_module.load_volume(scene, fixed_image, "fixed")
    moving = scene_module.load_volume(scene, moving_image, "moving")
    nodes = scene_module.load_registration_outputs(scene, outdir, fixed, moving)
    fixed_node, moving_node = markups(scene, "F", fixed_points), markups(scene, "M", moving_points)
    cli = json.loads((Path(outdir) / "report.json").read_text())["landmarks"]
    linear = landmarks.linearInterpolation
    landmarks.linearInterpolation = lambda transform: contextlib.nullcontext()  # as before: Slicer's cubic fields
    try:
        old = checkLandmarks(fixed_node, moving_node, nodes["transform"])  # the panel before: VTK inverse, cubic
        cubic = checkLandmarks(fixed_node, moving_node, nodes["transform"], nodes["inverse_transform"])
    finally:
        landmarks.linearInterpolation = linear
    vtk = checkLandmarks(fixed_node, moving_node, nodes["transform"])  # no inverse file: VTK inverse, linear
    new = checkLandmarks(fixed_node, moving_node, nodes["transform"], nodes["inverse_transform"])  # the panel now
    after = {name: np.array([p["after_mm"] for p in summary["points"]])
             for name, summary in (("cli", cli), ("old_panel_vtk_inverse_cubic", old),
                                   ("engine_inverse_cubic", cubic), ("vtk_inverse_linear", vtk),
                                   ("panel_now_engine_inverse_linear", new))}
    return {**{k: v.round(4).tolist() for k, v in after.items()},
            **{f"max_abs_diff_{k}_vs_cli_mm": float(np.abs(v - after["cli"]).max()) for k, v in after.items() if k != "cli"},
            "mean_after_mm": {k: float(v.mean()) for k, v in after.items()}}


if __name__ == "__main__":
    print(json.dumps(compare(*sys.argv[1:6]), indent=2))
