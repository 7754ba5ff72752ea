"""Intensity normalisation and foreground detection before DINO encoding.

DINO sees natural-image contrast, so each volume is mapped to [0, 1] robustly: CT (many voxels
at or below air, -1000 HU, and a range over 2000 HU) through a fixed HU window, anything else
by clipping to its 0.5 / 99.5 percentiles. Background (0 after normalisation) is what empty
slices are made of.
"""

from __future__ import annotations

import numpy as np
import torch

from dinoreg.core.intensity import robust_range

CT_WINDOW_HU = (-1000.0, 1000.0)  # wide enough for lung, soft tissue and bone edges
PERCENTILES = (0.005, 0.995)
FOREGROUND_LEVEL = 0.05  # normalised intensity above which a voxel is foreground (no mask given)
MAX_SAMPLES = 1_000_000


def _sample(values: torch.Tensor) -> torch.Tensor:
    """At most MAX_SAMPLES values, evenly strided (deterministic), as float32."""
    flat = values.reshape(-1)
    step = max(1, flat.numel() // MAX_SAMPLES)
    return flat[::step].float()


def looks_like_ct(image: torch.Tensor) -> bool:
    """Hounsfield units: over 5% of voxels at or below -800 (air, padding) and a range over 2000."""
    sample = _sample(image)
    if sample.numel() == 0:
        return False
    value_range = float(sample.max() - sample.min())
    air_fraction = float((sample <= -800).float().mean())
    return air_fraction > 0.05 and value_range > 2000


def normalise_intensity(image: torch.Tensor, mask: torch.Tensor | None = None,
                        ct_window: tuple[float, float] | None = None) -> torch.Tensor:
    """Map a volume (any shape, raw intensities) to float32 [0, 1].

    CT-looking images use ``ct_window`` (HU, default -1000..1000); others are clipped to the
    0.5 / 99.5 percentiles of the voxels inside ``mask`` (all voxels when None).
    """
    image = image.float()
    if looks_like_ct(image):
        low, high = ct_window or CT_WINDOW_HU
    else:
        array = image.detach().cpu().numpy()
        region = (mask > 0.5).cpu().numpy() if mask is not None and bool((mask > 0.5).any()) else np.ones(array.shape, bool)
        low, high = robust_range(array, region, 100 * PERCENTILES[0], 100 * PERCENTILES[1])
    if high <= low:
        return torch.zeros_like(image)
    return ((image - low) / (high - low)).clamp_(0.0, 1.0)


def foreground(normalised: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean foreground: the mask where given, else normalised intensity above FOREGROUND_LEVEL."""
    if mask is not None:
        return mask > 0.5
    return normalised > FOREGROUND_LEVEL
