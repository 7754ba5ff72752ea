"""The Extensions Index screenshot (Resources/Screenshots/result-layout.png): a real dinoreg result drawn in a Slicer-like layout.

What it is, honestly: NOT a screenshot of the Slicer application (there is none on the machine that made it).
It registers the clinical brain pair of the shared data (pyradiomics test data, BSD-3-Clause; two MR series of one
patient, 0.78 x 0.78 x 6.5 mm) with ``dinoreg register --method mind-zeroshot`` and draws the outputs the panel
loads (fixed image, moving image, warped image, difference after, Jacobian determinant) as four axial slice views
with Slicer's view colours, using matplotlib; the caption on the image says so.

    python benchmarks/extension_screenshot.py [--data /work/shared/data] [--outdir OUT] [--png Resources/Screenshots/result-layout.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VIEW_COLOURS = {"Red": "#c0504d", "Yellow": "#e8c547", "Green": "#6e9b4a", "Slice": "#5b7fa6"}


def register(data: Path, outdir: Path) -> None:
    """Run the engine once (kept in ``outdir``) unless its result is there already."""
    if (outdir / "report.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "dinoreg", "register", str(data / "clinical" / "brain1_image.nrrd"),
                    str(data / "clinical" / "brain2_image.nrrd"), "-o", str(outdir), "--method", "mind-zeroshot",
                    "--device", "cpu", "--quiet"], check=True)


def axial(path: Path, index: int | None = None) -> tuple[np.ndarray, int]:
    """(2D axial slice in radiological display order, slice index) of an image file."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "RAI")  # rows anterior->posterior, columns right->left
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    index = array.shape[0] // 2 + 2 if index is None else index
    return array[index], index


def normalise(slice2d: np.ndarray) -> np.ndarray:
    low, high = np.percentile(slice2d, (1, 99.5))
    return np.clip((slice2d - low) / max(high - low, 1e-6), 0, 1)


def draw(outdir: Path, data: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed, index = axial(data / "clinical" / "brain1_image.nrrd")
    warped, _ = axial(outdir / "warped.nii.gz", index)
    heat, _ = axial(outdir / "heatmap.nii.gz", index)
    jacobian, _ = axial(outdir / "jacobian.nii.gz", index)
    import SimpleITK as sitk  # the moving image on the fixed grid, for "before": resampled with identity

    moving_image = sitk.Resample(sitk.ReadImage(str(data / "clinical" / "brain2_image.nrrd")),
                                 sitk.ReadImage(str(data / "clinical" / "brain1_image.nrrd")))
    moving = sitk.GetArrayFromImage(sitk.DICOMOrient(moving_image, "RAI")).astype(np.float32)[index]

    def fade(background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """Slicer's foreground/background fade at 50 %: fixed in grey-magenta, moving in grey-green."""
        b, f = normalise(background), normalise(foreground)
        return np.stack([0.5 * b + 0.5 * b, 0.5 * b + 0.5 * f, 0.5 * b + 0.5 * f * 0.6], -1).clip(0, 1)

    views = [("Red", "Fixed + moving, before registration (fade 50 %)", fade(fixed, moving), None),
             ("Yellow", "Fixed + warped moving, after (fade 50 %)", fade(fixed, warped), None),
             ("Green", "Difference |fixed - warped| after", normalise(fixed), heat),
             ("Slice", "Jacobian determinant (red < 1 < green)", normalise(fixed), jacobian)]
    aspect = 0.78125 / 0.78125
    figure = plt.figure(figsize=(10.0, 7.2), dpi=90, facecolor="#1e1e1e")
    for position, (colour, title, background, overlay) in enumerate(views):
        axes = figure.add_axes([0.01 + 0.495 * (position % 2), 0.09 + 0.445 * (1 - position // 2), 0.485, 0.40])
        axes.imshow(background, cmap="gray" if background.ndim == 2 else None, aspect=aspect, interpolation="bilinear")
        if overlay is not None and colour == "Green":
            axes.imshow(np.ma.masked_less(overlay, np.percentile(overlay, 60)), cmap="hot", alpha=0.6, aspect=aspect)
        elif overlay is not None:
            axes.imshow(np.ma.masked_where(normalise(fixed) < 0.05, overlay), cmap="RdYlGn", vmin=0.0, vmax=2.0,
                        alpha=0.55, aspect=aspect)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_facecolor("black")
        for spine in axes.spines.values():
            spine.set_color(VIEW_COLOURS[colour])
            spine.set_linewidth(3)
        axes.set_title(f"{title}", color="white", fontsize=10, loc="left",
                       backgroundcolor=VIEW_COLOURS[colour], pad=3)
    figure.text(0.01, 0.035, "DINO Registration: mind-zeroshot result on a clinical brain MR pair (pyradiomics test data, "
                "BSD-3-Clause), axial slice " f"{index}.", color="white", fontsize=9)
    figure.text(0.01, 0.01, "Rendered with matplotlib from the engine's output files in a Slicer-like layout "
                "(benchmarks/extension_screenshot.py); not a capture of the Slicer application.", color="#bbbbbb",
                fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, facecolor=figure.get_facecolor())
    from PIL import Image  # matplotlib's own dependency: 256 colours keep the file small for the repository

    Image.open(png).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--outdir", type=Path, default=Path("screenshot-run"))
    parser.add_argument("--png", type=Path, default=REPO / "Resources" / "Screenshots" / "result-layout.png")
    args = parser.parse_args()
    register(args.data, args.outdir)
    draw(args.outdir, args.data, args.png)
    print(args.png)


if __name__ == "__main__":
    main()
