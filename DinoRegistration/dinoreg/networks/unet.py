"""VoxelMorph-style U-Net on the concatenated pair (Balakrishnan et al., TMI 2019), a baseline.

Encoder: strided 3x3x3 convolutions halving the grid ``len(encoder)`` times; decoder: upsample,
concatenate the encoder output of the same scale, convolve, up to the grid halved ``output_level``
times (0 = the input grid, with the input pair concatenated; the default 1 stops at half resolution,
like VoxelMorph's ``int_downsize=2``, which keeps a CPU forward well under a second); then a
near-zero-initialised flow layer, and the field is upsampled to the input grid. Optionally the
output is a stationary velocity integrated by scaling and squaring (diffeomorphic VoxelMorph).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from dinoreg.networks.base import RegistrationNetwork
from dinoreg.networks.blocks import ConvBlock, check_shape, flow_layer, flow_to_displacement, upsample_to


class VoxelMorphUNet(RegistrationNetwork):
    name = "unet"
    defaults: dict[str, Any] = {
        "encoder": [8, 16, 16, 16],   # channels of the strided encoder stages (each halves the grid)
        "decoder": [16, 16, 8],       # channels of the decoder stages, coarse to fine (len(encoder) - output_level)
        "output_level": 1,            # the flow is predicted on the grid halved this many times, then upsampled
        "integrate_steps": 0,
    }

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        encoder, decoder = [int(c) for c in self.config["encoder"]], [int(c) for c in self.config["decoder"]]
        self.output_level = int(self.config["output_level"])
        if not encoder or not 0 <= self.output_level < len(encoder) or len(decoder) != len(encoder) - self.output_level:
            raise ValueError("unet: needs len(decoder) == len(encoder) - output_level and 0 <= output_level < len(encoder)")
        self.down = nn.ModuleList()
        previous = 2
        for channels in encoder:
            self.down.append(ConvBlock(previous, channels, stride=2))
            previous = channels
        skips = ([2] + encoder[:-1])[self.output_level:]  # concatenated at each decoder stage, fine to coarse
        self.up = nn.ModuleList()
        for channels, skip in zip(decoder, reversed(skips)):
            self.up.append(ConvBlock(previous + skip, channels))
            previous = channels
        self.flow = flow_layer(previous)

    @property
    def shape_multiple(self) -> int:
        return 2 ** len(self.down)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        check_shape(fixed, self.shape_multiple, self.name)
        x = torch.cat([fixed, moving], dim=1)
        skips = [x]
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        skips.pop()  # the bottleneck itself
        for stage in self.up:
            skip = skips.pop()
            x = stage(torch.cat([upsample_to(x, skip), skip], dim=1))
        return flow_to_displacement(self.flow(x), int(self.config["integrate_steps"]), self.output_level)
