"""ViT-V-Net (Chen et al., 2021), a baseline: a convolutional encoder, a small Vision Transformer
bottleneck on patches of the coarsest features, and a V-Net decoder with skip connections (by
default the flow is predicted at half resolution and upsampled: ``output_level``).

The transformer is torch's ``nn.TransformerEncoder``; position embeddings are a learned coarse
volume interpolated to the token grid, so any input size works (the original fixed one size).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoreg.networks.base import RegistrationNetwork
from dinoreg.networks.blocks import Conv3d, ConvBlock, check_shape, flow_layer, flow_to_displacement, upsample_to


class ViTBottleneck(nn.Module):
    """Patch embedding (a strided convolution), a transformer over the tokens, back to a volume."""

    def __init__(self, in_channels: int, embed: int, patch: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = Conv3d(in_channels, embed, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, embed, 4, 4, 4))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(embed, heads, dim_feedforward=2 * embed, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        tokens = tokens + F.interpolate(self.position, size=tokens.shape[2:], mode="trilinear", align_corners=False)
        n, c, d, h, w = tokens.shape
        sequence = self.transformer(tokens.flatten(2).transpose(1, 2))
        return sequence.transpose(1, 2).reshape(n, c, d, h, w)


class ViTVNet(RegistrationNetwork):
    name = "vitvnet"
    defaults: dict[str, Any] = {
        "encoder": [8, 16, 32],     # strided conv stages (each halves the grid)
        "decoder": [32, 16, 8],     # decoder stages, coarse to fine
        "embed": 64,                # transformer width
        "patch": 2,                 # ViT patch size on the coarsest encoder features
        "transformer_layers": 2,
        "heads": 4,
        "output_level": 1,          # 0: a last decoder stage on the input grid; 1: the flow is predicted at 1/2 and upsampled
        "integrate_steps": 0,
    }

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.output_level = int(c["output_level"])
        if self.output_level not in (0, 1):
            raise ValueError("vitvnet: output_level is 0 (full grid) or 1 (half grid)")
        encoder, decoder = [int(v) for v in c["encoder"]], [int(v) for v in c["decoder"]]
        if len(encoder) != len(decoder) or not encoder:
            raise ValueError("vitvnet: encoder and decoder need the same number of stages (at least one)")
        self.down = nn.ModuleList()
        previous = 2
        for channels in encoder:
            self.down.append(ConvBlock(previous, channels, stride=2))
            previous = channels
        self.vit = ViTBottleneck(previous, int(c["embed"]), int(c["patch"]), int(c["transformer_layers"]), int(c["heads"]))
        previous = int(c["embed"])
        skips = [2] + encoder
        self.up = nn.ModuleList()
        for channels, skip in zip(decoder, reversed(skips[1:])):
            self.up.append(ConvBlock(previous + skip, channels))
            previous = channels
        self.final = ConvBlock(previous + 2, decoder[-1]) if self.output_level == 0 else None
        self.flow = flow_layer(decoder[-1])

    @property
    def shape_multiple(self) -> int:
        return 2 ** len(self.down) * int(self.config["patch"])

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        check_shape(fixed, self.shape_multiple, self.name)
        x = torch.cat([fixed, moving], dim=1)
        skips = [x]
        for stage in self.down:
            x = stage(x)
            skips.append(x)
        x = self.vit(x)
        for stage in self.up:
            skip = skips.pop()
            x = stage(torch.cat([upsample_to(x, skip), skip], dim=1))
        if self.final is not None:
            x = self.final(torch.cat([upsample_to(x, skips[0]), skips[0]], dim=1))
        return flow_to_displacement(self.flow(x), int(self.config["integrate_steps"]), self.output_level)
