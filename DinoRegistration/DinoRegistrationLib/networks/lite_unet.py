"""A light U-Net on intensities whose field lives at half the input resolution (CPU-trainable).

Input: fixed and moving images ``(N, 1, D, H, W)`` each, intensities in [0, 1], on one grid whose
sides are multiples of ``2 ** len(channels)``. Output: a displacement ``(N, 3, D, H, W)`` in voxels
of that grid (channel k along tensor axis k + 2, the geometry core's convention), fixed -> moving.

Architecture: a stride-2 convolution straight from the 2-channel input (no full-resolution feature
maps: they cost most of a VoxelMorph U-Net's time on a CPU), ``len(channels)`` encoder levels
(1/2 ... 1/2^L), a decoder with skips back up to 1/2 resolution, a stationary velocity field there
integrated by scaling-and-squaring (``integration_steps``, 0 = plain displacement), then resized to
the input grid. About 0.1-0.3 M parameters (a 1-2 MB safetensors file).

Written by hand (not MONAI's ``VoxelMorphUNet``): MONAI's U-Net decodes to full resolution, about
8x the work per step on this project's CPUs, and importing ``monai.networks`` costs seconds.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..geometry import integrate_velocity, resize_field


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3x3 convolution + LeakyReLU(0.2)."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class LiteUNet(nn.Module):
    """Fixed + moving -> voxel displacement; see the module docstring."""

    def __init__(self, channels: Sequence[int] = (16, 32, 32, 32), integration_steps: int = 7,
                 in_channels: int = 1) -> None:
        super().__init__()
        self.channels = list(channels)
        self.integration_steps = int(integration_steps)
        self.down = nn.ModuleList()
        previous = 2 * in_channels
        for width in self.channels:
            self.down.append(nn.Sequential(conv_block(previous, width, stride=2), conv_block(width, width)))
            previous = width
        self.up = nn.ModuleList()
        for skip in reversed(self.channels[:-1]):
            self.up.append(conv_block(previous + skip, skip))
            previous = skip
        self.refine = conv_block(previous, previous)
        self.flow = nn.Conv3d(previous, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    @property
    def shape_multiple(self) -> int:
        """Every input side must be a multiple of this."""
        return 2 ** len(self.channels)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        shape = tuple(fixed.shape[2:])
        if any(side % self.shape_multiple for side in shape):
            raise ValueError(f"input sides {shape} must be multiples of {self.shape_multiple}: pad the images")
        x = torch.cat([fixed, moving], dim=1)
        skips = []
        for level in self.down:
            x = level(x)
            skips.append(x)
        for level, skip in zip(self.up, reversed(skips[:-1])):
            x = nn.functional.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = level(torch.cat([x, skip], dim=1))
        velocity = self.flow(self.refine(x))
        field = integrate_velocity(velocity, self.integration_steps) if self.integration_steps else velocity
        return resize_field(field, shape)
