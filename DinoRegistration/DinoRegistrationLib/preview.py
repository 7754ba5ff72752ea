"""``preview.png``: orthogonal mid-slices of fixed, moving, warped and the heatmaps, at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .intensity import normalise, robust_range
from .volume import Volume


def lps_view(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxel array permuted and flipped to the axes closest to LPS (as ``sitk.DICOMOrient(.., "LPS")``)
    and its spacing (sx, sy, sz) mm: array [k, j, i] = [S, P, L]. A numpy view, no copy (DICOMOrient
    copied the whole volume, five times per preview)."""
    direction = np.asarray(volume.grid.direction, dtype=np.float64)
    spacing = np.asarray(volume.grid.spacing, dtype=np.float64)
    order = [0, 1, 2]
    lps_axis_of = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]  # index axis i, j, k -> L, P or S
    if sorted(lps_axis_of) != [0, 1, 2]:  # oblique enough to be ambiguous: keep the storage order
        lps_axis_of = order
    permutation = [0, 0, 0]
    new_spacing = [0.0, 0.0, 0.0]
    for a, p in enumerate(lps_axis_of):
        permutation[2 - p] = 2 - a  # numpy axes run k, j, i
        new_spacing[p] = float(spacing[a])
    array = np.transpose(volume.array, permutation)
    flips = tuple(2 - p for a, p in enumerate(lps_axis_of) if direction[p, a] < 0)
    if flips:
        array = np.flip(array, flips)
    return array, (new_spacing[0], new_spacing[1], new_spacing[2])


def mid_slices(volume: Volume) -> list[tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal mid-slices, each with its pixel aspect ratio (height / width).

    The volume is first viewed in the axes closest to LPS (:func:`lps_view`), so the views are
    anatomical whatever the storage order (RAS, LIA, ...): array [k, j, i] = [S, P, L].
    Superior is drawn at the top of coronal and sagittal views.
    """
    array, (sx, sy, sz) = lps_view(volume)
    k, j, i = (n // 2 for n in array.shape)
    return [(array[k, :, :], sy / sx), (array[::-1, j, :], sz / sx), (array[::-1, :, i], sz / sy)]


def write_preview(path: Path, fixed: Volume, moving_on_fixed_grid: Volume, warped: Volume, heatmap_before: Volume,
                  heatmap: Volume, title: str) -> Path:
    """Draw a 3 x 5 grid (rows: axial, coronal, sagittal) and save it as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moving_range = robust_range(moving_on_fixed_grid.array)
    # (name, volume, intensity range mapped to [0, 1] or None for the heatmaps, colour map, top of the scale);
    # only the drawn slices are normalised
    panels = [
        ("fixed", fixed, robust_range(fixed.array), "gray", 1.0),
        ("moving (unregistered)", moving_on_fixed_grid, moving_range, "gray", 1.0),
        ("warped", warped, moving_range, "gray", 1.0),
        ("|difference| before", heatmap_before, None, "hot", 0.5),
        ("|difference| after", heatmap, None, "hot", 0.5),
    ]
    figure, axes = plt.subplots(3, len(panels), figsize=(3 * len(panels), 9), facecolor="black")
    for column, (name, volume, value_range, colormap, vmax) in enumerate(panels):
        for row, (image, aspect) in enumerate(mid_slices(volume)):
            if value_range is not None:
                image = normalise(np.ascontiguousarray(image), value_range)
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
