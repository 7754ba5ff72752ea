"""One 3-D sampler for the whole engine: ``F.grid_sample`` that uses every CPU thread."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: below this many sample points the split is not worth its copy
MIN_POINTS_TO_SPLIT = 65536


def grid_sample_3d(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                   padding_mode: str = "border") -> torch.Tensor:
    """``F.grid_sample(image, grid, mode, padding_mode, align_corners=True)`` for ``image (N, C, D, H, W)``
    and ``grid (N, D', H', W', 3)`` (x, y, z in [-1, 1]); same values and gradients.

    Why not ``F.grid_sample`` alone: PyTorch's CPU 3-D sampler parallelises over the batch only,
    so one volume (batch 1, every registration) runs on one thread. Here the sample points are
    split into one batch entry per thread, with the image expanded (not copied): measured 1.8-2x
    faster on 2 cores for the warps, the field integration and the inverse.
    """
    threads = torch.get_num_threads()
    points_per_volume = grid[0, ..., 0].numel()
    if (image.device.type != "cpu" or image.shape[0] != 1 or grid.shape[0] != 1 or threads < 2
            or points_per_volume < MIN_POINTS_TO_SPLIT):
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    points = grid.reshape(-1, 3)
    per_thread = -(-points_per_volume // threads)
    padding = per_thread * threads - points_per_volume
    if padding:
        points = torch.cat([points, points.new_zeros(padding, 3)])
    values = F.grid_sample(image.expand(threads, -1, -1, -1, -1), points.view(threads, 1, 1, per_thread, 3), mode=mode,
                           padding_mode=padding_mode, align_corners=True)  # (threads, C, 1, 1, per_thread)
    channels = image.shape[1]
    values = values.permute(1, 0, 2, 3, 4).reshape(channels, -1)[:, :points_per_volume]
    return values.reshape(1, channels, *grid.shape[1:4])
