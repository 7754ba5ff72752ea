"""``preview.png``: orthogonal mid-slices of fixed, moving, warped and the heatmaps, at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .intensity import normalise, robust_range
from .volume import Volume


def mid_slices(volume: Volume) -> list[tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal mid-slices, each with its pixel aspect ratio (height / width).

    The volume is first permuted and flipped to the axes closest to LPS (``sitk.DICOMOrient``), so
    the views are anatomical whatever the storage order (RAS, LIA, ...): array [k, j, i] = [S, P, L].
    Superior is drawn at the top of coronal and sagittal views.
    """
    oriented = Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "LPS"))
    array = oriented.array
    sx, sy, sz = oriented.grid.spacing
    k, j, i = (n // 2 for n in array.shape)
    return [(array[k, :, :], sy / sx), (array[::-1, j, :], sz / sx), (array[::-1, :, i], sz / sy)]


def write_preview(path: Path, fixed: Volume, moving_on_fixed_grid: Volume, warped: Volume, heatmap_before: Volume,
                  heatmap: Volume, title: str) -> Path:
    """Draw a 3 x 5 grid (rows: axial, coronal, sagittal) and save it as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moving_range = robust_range(moving_on_fixed_grid.array)
    panels = [
        ("fixed", fixed.with_array(normalise(fixed.array, robust_range(fixed.array))), "gray", 1.0),
        ("moving (unregistered)", moving_on_fixed_grid.with_array(normalise(moving_on_fixed_grid.array, moving_range)), "gray", 1.0),
        ("warped", warped.with_array(normalise(warped.array, moving_range)), "gray", 1.0),
        ("|difference| before", heatmap_before, "hot", 0.5),
        ("|difference| after", heatmap, "hot", 0.5),
    ]
    figure, axes = plt.subplots(3, len(panels), figsize=(3 * len(panels), 9), facecolor="black")
    for column, (name, volume, colormap, vmax) in enumerate(panels):
        for row, (image, aspect) in enumerate(mid_slices(volume)):
            axis = axes[row, column]
            axis.imshow(image, cmap=colormap, vmin=0.0, vmax=vmax, aspect=aspect, interpolation="nearest")
            axis.set_axis_off()
            if row == 0:
                axis.set_title(name, color="white", fontsize=10)
    figure.suptitle(title, color="white", fontsize=11)
    figure.tight_layout()
    temporary = path.with_name(".tmp-" + path.name)
    figure.savefig(temporary, dpi=80, facecolor="black")
    plt.close(figure)
    temporary.replace(path)
    return path
