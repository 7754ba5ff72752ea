"""Registration networks: one registry, picked by name from the CLI, the API and the Slicer panel.

Every network is a :class:`RegistrationNetwork`: ``forward(fixed, moving)`` on normalised images
``(N, 1, D, H, W)`` whose sizes are multiples of ``network.shape_multiple`` returns the voxel
displacement ``(N, 3, D, H, W)`` (channel k along tensor axis k + 2, see ``geometry``) mapping
fixed voxels to moving voxels. ``network.config`` is the full configuration (defaults merged).

- ``fmir``: FMIR-style head on frozen features (``backend``: mind | intensity | dino) - ``fmir.py``
- ``unet``: VoxelMorph-style U-Net baseline - ``unet.py``
- ``vitvnet``: ViT-V-Net baseline (small ViT bottleneck) - ``vitvnet.py``
- ``dino-vitvnet`` / ``dino-encdec``: DINOv2 + ViT-V-Net and its encoder-decoder variant - ``dino_vitvnet.py``

Networks needing DINO weights (``dino-*``, and ``fmir`` with ``backend='dino'``) load the frozen
backbone through ``features/dino`` when built; the tests use tiny random backbones.
"""

from __future__ import annotations

from typing import Any

from dinoreg.networks.base import RegistrationNetwork
from dinoreg.networks.dino_vitvnet import DinoEncoderDecoder, DinoViTVNet
from dinoreg.networks.fmir import FMIRHead
from dinoreg.networks.unet import VoxelMorphUNet
from dinoreg.networks.vitvnet import ViTVNet


def network_classes() -> dict[str, type[RegistrationNetwork]]:
    """Network name -> class (imported here so that importing the package stays light)."""
    return {cls.name: cls for cls in (FMIRHead, VoxelMorphUNet, ViTVNet, DinoViTVNet, DinoEncoderDecoder)}


def build_network(name: str, config: dict[str, Any] | None = None) -> RegistrationNetwork:
    """The network ``name`` built from ``config`` (missing keys take the defaults; unknown keys raise ValueError)."""
    classes = network_classes()
    if name not in classes:
        raise ValueError(f"unknown network {name!r}: choose one of {sorted(classes)}")
    return classes[name](config)


def needs_dino(name: str, config: dict[str, Any] | None = None) -> bool:
    """Whether building ``name`` with ``config`` loads DINO weights."""
    config = config or {}
    return name.startswith("dino-") or (name == "fmir" and config.get("backend", "mind") == "dino")


__all__ = ["RegistrationNetwork", "build_network", "network_classes", "needs_dino"]
