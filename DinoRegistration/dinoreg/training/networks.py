"""Build a network of the engine's registry (``networks.build_network``) for training."""

from __future__ import annotations

import torch

from dinoreg.errors import InputError
from dinoreg.networks import build_network


def build_training_network(name: str, config: dict) -> torch.nn.Module:
    """The network ``name`` with ``config`` (forward(fixed, moving) -> voxel field); one-line error otherwise."""
    try:
        return build_network(name, dict(config))
    except ValueError as error:
        raise InputError(f"network: {error}") from None


def shape_multiple(network: torch.nn.Module) -> int:
    """Side multiple the network needs (16 when it does not say)."""
    return int(getattr(network, "shape_multiple", 16))
