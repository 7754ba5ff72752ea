"""DINOv2 + ViT-V-Net (the project's first source) and its simple encoder-decoder variant.

The pair ``cat(fixed, moving)`` goes through three strided conv stages (1/2, 1/4, 1/8 of the
grid); their outputs are resized to the 1/2 grid, concatenated and fused by a 1x1x1 convolution
to a 3-channel volume. Slices of that volume along tensor axis D (every ``slice_stride``-th at
the 1/2 grid, i.e. one per 1/8 cell) are fed as RGB images to a FROZEN DINOv2/v3 encoder (weights
from ``features/dino``, not stored in our checkpoints); gradients flow through it to the conv
stages. Patch tokens are arranged on the 1/8 grid (one token per 1/8 voxel), projected to the
decoder width and decoded: with V-Net skips from the conv stages (``dino-vitvnet``) or without
(``dino-encdec``, the simple encoder-decoder). A flow layer gives the field (by default on the 1/2
grid, upsampled: ``output_level``); the spatial transformer is ``geometry.warp``.

The source paper's own result was weak (Dice 0.362 vs 0.332 unregistered): the architecture is
carried so it can be measured, and it needs real DINO weights to mean anything.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoreg.networks.base import RegistrationNetwork
from dinoreg.networks.blocks import Conv3d, ConvBlock, check_shape, flow_layer, flow_to_displacement, upsample_to


class DinoViTVNet(RegistrationNetwork):
    name = "dino-vitvnet"
    skips = True
    defaults: dict[str, Any] = {
        "dino_model": "facebook/dinov2-with-registers-small",
        "encoder": [8, 16, 32],      # the three strided conv stages
        "decoder": [32, 16, 8],      # decoder stages, coarse to fine (1/4, 1/2, full grid)
        "output_level": 1,           # 1: the full-grid stage is skipped, the flow is predicted at 1/2 and upsampled
        "integrate_steps": 0,
    }

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        from dinoreg.features.dino import load_backbone  # lazy: imports SimpleITK, numpy

        encoder, decoder = [int(v) for v in self.config["encoder"]], [int(v) for v in self.config["decoder"]]
        if len(encoder) != 3 or len(decoder) != 3:
            raise ValueError(f"{self.name}: encoder and decoder have exactly three stages")
        backbone = load_backbone(str(self.config["dino_model"]), "cpu")
        # kept out of the module tree: frozen weights are not part of our checkpoints
        self._backbone_info = {"kind": "dino", "model": str(self.config["dino_model"]), "family": backbone.family,
                               "hidden_size": backbone.hidden_size, "patch_size": backbone.patch_size,
                               "source": backbone.source}
        self.down = nn.ModuleList([ConvBlock(2, encoder[0], 2), ConvBlock(encoder[0], encoder[1], 2),
                                   ConvBlock(encoder[1], encoder[2], 2)])
        self.fuse = Conv3d(sum(encoder), 3, 1)
        self.bottleneck = ConvBlock(backbone.hidden_size, decoder[0])
        skip_channels = [encoder[1], encoder[0], 2] if self.skips else [0, 0, 0]
        widths = [decoder[0], *decoder]
        self.output_level = int(self.config["output_level"])
        if self.output_level not in (0, 1):
            raise ValueError(f"{self.name}: output_level is 0 (full grid) or 1 (half grid)")
        stages = 3 - self.output_level
        self.up = nn.ModuleList(ConvBlock(widths[i] + skip_channels[i], widths[i + 1]) for i in range(stages))
        self.flow = flow_layer(widths[stages])

    @property
    def shape_multiple(self) -> int:
        return 8

    def feature_identity(self) -> dict[str, Any]:
        return dict(self._backbone_info)

    def encode_slices(self, fused: torch.Tensor, token_shape: tuple[int, int, int]) -> torch.Tensor:
        """DINO tokens of slices of the 3-channel volume ``fused (N, 3, D/2, H/2, W/2)``: ``(N, C, D/8, H/8, W/8)``."""
        from dinoreg.features.dino import load_backbone  # lazy: imports SimpleITK, numpy

        backbone = load_backbone(str(self.config["dino_model"]), fused.device)
        n, _, depth = fused.shape[:3]
        slices, rows, cols = token_shape
        index = ((torch.arange(slices, device=fused.device) + 0.5) * depth / slices).long().clamp_(max=depth - 1)
        chosen = fused.index_select(2, index).permute(0, 2, 1, 3, 4).reshape(n * slices, 3, *fused.shape[3:])
        pixels = F.interpolate(chosen, size=(rows * backbone.patch_size, cols * backbone.patch_size), mode="bilinear",
                               align_corners=False)
        hidden = backbone.model(pixel_values=pixels).last_hidden_state[:, backbone.num_prefix_tokens:]
        return hidden.reshape(n, slices, rows, cols, -1).permute(0, 4, 1, 2, 3)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        check_shape(fixed, self.shape_multiple, self.name)
        x = torch.cat([fixed, moving], dim=1)
        e1 = self.down[0](x)
        e2 = self.down[1](e1)
        e3 = self.down[2](e2)
        fused = self.fuse(torch.cat([e1, upsample_to(e2, e1), upsample_to(e3, e1)], dim=1))
        tokens = self.encode_slices(fused, tuple(e3.shape[2:]))
        y = self.bottleneck(tokens)
        for stage, skip in zip(self.up, (e2, e1, x)):
            y = upsample_to(y, skip)
            y = stage(torch.cat([y, skip], dim=1) if self.skips else y)
        return flow_to_displacement(self.flow(y), int(self.config["integrate_steps"]), self.output_level)


class DinoEncoderDecoder(DinoViTVNet):
    """The simple encoder-decoder variant: DINO tokens decoded without skip connections."""

    name = "dino-encdec"
    skips = False
