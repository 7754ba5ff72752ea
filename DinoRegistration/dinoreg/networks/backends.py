"""Frozen feature backends feeding the FMIR head: raw intensities, MIND-SSC, DINO slice features.

A backend maps normalised images ``(N, 1, D, H, W)`` (intensities in [0, 1]) to features
``(N, C, d, h, w)`` covering the same box, possibly on a coarser cell-centred grid (DINO gives
one vector per ViT token). Backends have no trainable parameters and run without gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class FeatureBackend:
    """Base class: ``channels`` features per voxel (or token); ``identity()`` describes it for model cards."""

    kind = ""
    channels = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "channels": self.channels}


class IntensityBackend(FeatureBackend):
    """The normalised intensities themselves (one channel)."""

    kind = "intensity"
    channels = 1

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()


class MindBackend(FeatureBackend):
    """MIND-SSC descriptors (12 channels, ``features/mind.py``), radius and dilation in voxels."""

    kind = "mind"

    def __init__(self, radius: int = 1, dilation: int = 2) -> None:
        from dinoreg.features.mind import MIND_CHANNELS  # lazy: imports SimpleITK, numpy

        self.radius, self.dilation = int(radius), int(dilation)
        self.channels = MIND_CHANNELS

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from dinoreg.features.mind import mind_ssc  # lazy: imports SimpleITK, numpy

        with torch.no_grad():
            return torch.cat([mind_ssc(image[None].float(), None, self.radius, self.dilation) for image in images])

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "radius": self.radius, "dilation": self.dilation}


class DinoBackend(FeatureBackend):
    """Frozen DINOv2/DINOv3 run on slices along tensor axis D (FMIR's recipe).

    Every ``slice_stride``-th slice (the centres of equal bins along D) is resized so one ViT token
    covers ``token_voxels`` x ``token_voxels`` voxels, grey is replicated to RGB with ImageNet
    statistics, and the class/register tokens are dropped. Output: ``(N, hidden, D / stride, H / tv, W / tv)``
    token features (cell-centred over the same box). The backbone comes from ``features/dino``
    (a hub id, a local Hugging Face folder or a Meta checkpoint), loaded once per device.
    """

    kind = "dino"

    def __init__(self, model: str, token_voxels: int = 4, slice_stride: int = 2) -> None:
        from dinoreg.features.dino import load_backbone  # lazy: imports SimpleITK, numpy

        self.model, self.token_voxels, self.slice_stride = str(model), int(token_voxels), int(slice_stride)
        backbone = load_backbone(self.model, "cpu")
        self.channels = backbone.hidden_size
        self.family, self.patch_size, self.source = backbone.family, backbone.patch_size, backbone.source

    def backbone(self, device: torch.device):
        from dinoreg.features.dino import load_backbone  # lazy: imports SimpleITK, numpy

        return load_backbone(self.model, device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from dinoreg.features.dino.backbones import imagenet_normalise  # lazy: imports SimpleITK, numpy

        backbone = self.backbone(images.device)
        n, _, depth, height, width = images.shape
        slices = max(1, depth // self.slice_stride)
        index = ((torch.arange(slices, device=images.device) + 0.5) * depth / slices).long().clamp_(max=depth - 1)
        tokens = (max(1, round(height / self.token_voxels)), max(1, round(width / self.token_voxels)))
        pixels = (tokens[0] * self.patch_size, tokens[1] * self.patch_size)
        chosen = images[:, 0].index_select(1, index).reshape(n * slices, 1, height, width).float()
        resized = F.interpolate(chosen, size=pixels, mode="bilinear", align_corners=False)
        with torch.no_grad():
            encoded = backbone.encode(imagenet_normalise(resized.clamp(0.0, 1.0))).float()  # (n*slices, h*w, C)
        features = encoded.reshape(n, slices, tokens[0], tokens[1], -1).permute(0, 4, 1, 2, 3)
        return features.contiguous()

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "model": self.model, "family": self.family, "patch_size": self.patch_size,
                "token_voxels": self.token_voxels, "slice_stride": self.slice_stride, "source": self.source}


def build_backend(kind: str, config: dict[str, Any]) -> FeatureBackend:
    """The backend named ``kind`` ('intensity' | 'mind' | 'dino') with its options from ``config``."""
    if kind == "intensity":
        return IntensityBackend()
    if kind == "mind":
        return MindBackend(int(config.get("mind_radius", 1)), int(config.get("mind_dilation", 2)))
    if kind == "dino":
        return DinoBackend(str(config["dino_model"]), int(config.get("dino_token_voxels", 4)),
                           int(config.get("dino_slice_stride", 2)))
    raise ValueError(f"unknown feature backend {kind!r}: use 'intensity', 'mind' or 'dino'")
