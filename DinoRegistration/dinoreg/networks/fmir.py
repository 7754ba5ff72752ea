"""FMIR-style registration head on frozen features (the project's FMIR source).

Pipeline of ``forward(fixed, moving)``:

1. frozen features of both images (``backends.py``: intensities, MIND-SSC or DINO slice tokens);
   voxel-wise backends (MIND, intensities) run on the head grid, so ``mind_radius`` and
   ``mind_dilation`` count head-grid voxels;
2. channel reduction to ``channels``: while training a random subset of the raw channels per step
   (FMIR's channel regularisation); at inference a fixed projection on a basis fitted on TRAINING
   features (:meth:`FMIRHead.fit_channel_basis`, uncentred SVD) and stored in the checkpoint as the
   buffer ``channel_basis`` (never refitted per pair); backends with <= ``channels`` raw channels
   are used as they are;
3. features resized to the head grid (the input grid divided by ``head_downsample``) and a small
   3D conv block (``context_layers`` layers, shared by both images) restoring volumetric context;
4. a ``levels``-level pyramid (average pooling by 2; FMIR uses 5 levels from full resolution): from the coarsest level, warp the moving
   features with the upsampled field, fuse ``cat(f + m, f - m)``, predict a residual field
   (optionally a velocity integrated by scaling and squaring) and compose it before the current
   field (``u <- compose(r, u)``); the finest field is upsampled to the input grid.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoreg.core.geometry import compose, integrate_velocity, upsample_field, warp
from dinoreg.networks.backends import FeatureBackend, build_backend
from dinoreg.networks.base import RegistrationNetwork
from dinoreg.networks.blocks import ConvBlock, check_shape, flow_layer


class FMIRHead(RegistrationNetwork):
    name = "fmir"
    defaults: dict[str, Any] = {
        "backend": "mind",          # 'mind' | 'intensity' | 'dino'
        "channels": 12,             # feature channels the head sees (random subset while training, PCA at inference)
        "context_channels": 8,      # width of the context block and of the pyramid
        "context_layers": 3,
        "levels": 4,                # pyramid levels (each halves the grid)
        "head_downsample": 2,       # the head works on the input grid divided by this (1 = full resolution)
        # FMIR's own setting is head_downsample=1, levels=5 (scales 1 .. 1/16); the defaults keep its
        # coarsest scale (1/16) but drop the full-resolution level, for a CPU forward well under a
        # second at 2 mm brain size (sizes must then be multiples of 16, not 32: 80x96x112 fits)
        "integrate_steps": 0,       # > 0: residuals are velocities integrated with this many squarings
        "mind_radius": 1,
        "mind_dilation": 1,         # head-grid voxels (2 input voxels at head_downsample 2)
        "dino_model": "facebook/dinov2-with-registers-small",
        "dino_token_voxels": 4,
        "dino_slice_stride": 2,
    }

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.backend: FeatureBackend = build_backend(str(c["backend"]), c)
        self.raw_channels = int(self.backend.channels)
        self.channels = min(int(c["channels"]), self.raw_channels)
        width, levels = int(c["context_channels"]), int(c["levels"])
        if levels < 1 or int(c["head_downsample"]) < 1:
            raise ValueError("levels and head_downsample must be >= 1")
        # basis rows: the projection of raw features onto ``channels`` directions (identity when not reduced)
        self.register_buffer("channel_basis", torch.eye(self.raw_channels)[: self.channels].clone())
        self.register_buffer("channel_basis_fitted", torch.tensor(self.channels == self.raw_channels))
        layers = [ConvBlock(self.channels, width)] + [ConvBlock(width, width) for _ in range(int(c["context_layers"]) - 1)]
        self.context = nn.Sequential(*layers)
        self.fusion = nn.ModuleList(nn.Sequential(ConvBlock(2 * width, width), flow_layer(width)) for _ in range(levels))

    @property
    def shape_multiple(self) -> int:
        return int(self.config["head_downsample"]) * 2 ** (int(self.config["levels"]) - 1)

    def feature_identity(self) -> dict[str, Any]:
        return self.backend.identity()

    # ------------------------------------------------------------------ channel reduction

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backend features ``(N, raw_channels, d, h, w)`` (for fitting the channel basis)."""
        return self.backend(images)

    @torch.no_grad()
    def fit_channel_basis(self, samples: torch.Tensor) -> None:
        """Fit the inference projection on TRAINING feature samples ``(M, raw_channels)``: the top
        ``channels`` right singular vectors of the uncentred samples (FMIR's low-rank SVD)."""
        if samples.dim() != 2 or samples.shape[1] != self.raw_channels:
            raise ValueError(f"samples must be (M, {self.raw_channels}), got {tuple(samples.shape)}")
        if self.channels < self.raw_channels:
            _, _, vh = torch.linalg.svd(samples.float(), full_matrices=False)
            self.channel_basis.copy_(vh[: self.channels].to(self.channel_basis))
        self.channel_basis_fitted.fill_(True)

    def reduce_channels(self, features: torch.Tensor, subset: torch.Tensor | None) -> torch.Tensor:
        if self.channels == self.raw_channels:
            return features
        if subset is not None:
            return features.index_select(1, subset)
        if not bool(self.channel_basis_fitted):
            raise ValueError("this FMIR head reduces channels but its channel basis was never fitted: "
                             "call fit_channel_basis on training features before inference")
        return torch.einsum("cr,nr...->nc...", self.channel_basis.to(features.dtype), features)

    def features(self, images: torch.Tensor, subset: torch.Tensor | None, head_shape: tuple[int, ...]) -> torch.Tensor:
        if self.backend.kind != "dino" and tuple(images.shape[2:]) != tuple(head_shape):
            # voxel-wise backends run on the head grid (8x cheaper MIND at head_downsample 2)
            images = F.avg_pool3d(images, int(self.config["head_downsample"]))
        reduced = self.reduce_channels(self.backend(images), subset)
        if tuple(reduced.shape[2:]) != tuple(head_shape):
            reduced = F.interpolate(reduced, size=head_shape, mode="trilinear", align_corners=False)
        return self.context(reduced)

    # ------------------------------------------------------------------ forward

    def encode(self, images: torch.Tensor, subset: torch.Tensor | None) -> list[torch.Tensor]:
        """Context features of ``images`` on the head grid and its pooled levels, finest first."""
        down = int(self.config["head_downsample"])
        head_shape = tuple(int(n) // down for n in images.shape[2:])
        pyramid = [self.features(images, subset, head_shape)]
        for _ in range(len(self.fusion) - 1):
            pyramid.append(F.avg_pool3d(pyramid[-1], 2))
        return pyramid

    def decode(self, fixed_pyramid: list[torch.Tensor], moving_pyramid: list[torch.Tensor]) -> torch.Tensor:
        """Coarse-to-fine residual fields composed into the displacement on the input grid."""
        steps = int(self.config["integrate_steps"])
        field = None
        for level in reversed(range(len(self.fusion))):
            f, m = fixed_pyramid[level], moving_pyramid[level]
            if field is not None:
                field = upsample_field(field, 2)
                m = warp(m, field)
            residual = self.fusion[level](torch.cat([f + m, f - m], dim=1))
            if steps > 0:
                residual = integrate_velocity(residual, steps)
            field = residual if field is None else compose(residual, field)
        return upsample_field(field, int(self.config["head_downsample"]))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        check_shape(fixed, self.shape_multiple, self.name)
        subset = None
        if self.training and self.channels < self.raw_channels:
            subset = torch.randperm(self.raw_channels, device=fixed.device)[: self.channels]
        return self.decode(self.encode(fixed, subset), self.encode(moving, subset))

    def symmetric_forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """As the base class, with each image's features computed once for both directions."""
        check_shape(fixed, self.shape_multiple, self.name)
        fixed_pyramid, moving_pyramid = self.encode(fixed, None), self.encode(moving, None)
        return 0.5 * (self.decode(fixed_pyramid, moving_pyramid) - self.decode(moving_pyramid, fixed_pyramid)).float()
