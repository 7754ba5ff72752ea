"""What every registration network provides: the common constructor, config and shape rule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class RegistrationNetwork(nn.Module):
    """``forward(fixed, moving)`` on images ``(N, 1, D, H, W)`` (normalised to [0, 1], one grid, each
    size a multiple of :attr:`shape_multiple`) returns the voxel displacement ``(N, 3, D, H, W)``
    (channel k along tensor axis k + 2) mapping FIXED voxels to MOVING voxels: ``warp(moving, u)``
    looks like ``fixed``.

    Subclasses set :attr:`name` and :attr:`defaults` (every config key with its default value) and
    build their layers from ``self.config``.
    """

    name = ""
    defaults: dict[str, Any] = {}

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        unknown = sorted(set(config or {}) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown {self.name} config keys {unknown}: known keys are {sorted(self.defaults)}")
        self.config: dict[str, Any] = {**self.defaults, **(config or {})}

    @property
    def shape_multiple(self) -> int:
        """Every input size must be a multiple of this (2^number of halvings)."""
        raise NotImplementedError

    def feature_identity(self) -> dict[str, Any]:
        """The frozen feature extractor this network depends on (for the model card); plain intensities by default."""
        return {"kind": "intensity", "channels": 1}

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def symmetric_forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``0.5 * (net(f, m) - net(m, f))``: exactly zero for identical inputs, and swapping the
        inputs negates it. Both directions run as one batch; subclasses may share work between them."""
        both = self(torch.cat([fixed, moving]), torch.cat([moving, fixed])).float()
        forward, backward = both.chunk(2)
        return 0.5 * (forward - backward)
