"""Build a network by name for training: the engine's network registry, plus ``lite-unet``."""

from __future__ import annotations

import torch

from ..errors import InputError


def build_training_network(name: str, config: dict) -> torch.nn.Module:
    """The network ``name`` with constructor arguments ``config`` (forward(fixed, moving) -> voxel field)."""
    try:
        from ..networks import build_network  # the registry (issue 8)
    except ImportError:
        build_network = None
    if build_network is not None:
        try:
            return build_network(name, dict(config))
        except (KeyError, ValueError, InputError):
            if name != "lite-unet":
                raise
    if name == "lite-unet":
        from ..networks.lite_unet import LiteUNet

        try:
            return LiteUNet(**config)
        except TypeError as error:
            raise InputError(f"network.config for lite-unet: {error}: use channels, integration_steps, in_channels") from None
    raise InputError(f"unknown network {name!r}: see `dinoreg methods` for the registry's networks")


def shape_multiple(network: torch.nn.Module) -> int:
    """Side multiple the network needs (16 when it does not say)."""
    return int(getattr(network, "shape_multiple", 16))
