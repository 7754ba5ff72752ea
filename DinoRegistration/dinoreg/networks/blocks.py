"""Small building blocks shared by the networks (plain torch).

Written with torch.nn rather than MONAI's blocks on purpose: importing any MONAI module imports all
of MONAI (seconds on a laptop CPU), which every learned registration would pay at start-up; the
blocks here are a convolution and an activation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinoreg.core.geometry import integrate_velocity, upsample_field


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes oneDNN (mkldnn) on the CPU.

    PyTorch's own heuristic sends a batch-1 3D convolution whose ``channels * D * H`` is below
    20480 (small channel counts: the first layer on the image pair, 8-channel layers, flow layers)
    to its im2col fallback, measured 4-5x slower on this project's 2-core CPU than oneDNN for the
    same result. Same parameters and state dict as ``nn.Conv3d``; other devices are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple) and _MKLDNN):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


_MKLDNN = hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available()


class ConvBlock(nn.Sequential):
    """3x3x3 convolution (optionally strided) followed by LeakyReLU(0.2), as in VoxelMorph."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


def flow_layer(in_channels: int) -> nn.Conv3d:
    """3x3x3 convolution to a 3-channel displacement, initialised near zero (VoxelMorph's N(0, 1e-5)),
    so an untrained network starts at the identity."""
    layer = Conv3d(in_channels, 3, 3, padding=1)
    nn.init.normal_(layer.weight, 0.0, 1e-5)
    nn.init.zeros_(layer.bias)
    return layer


def upsample_to(volume: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Trilinear resize of feature maps ``volume`` to the spatial shape of ``like`` (cell-centred grids)."""
    if volume.shape[2:] == like.shape[2:]:
        return volume
    return F.interpolate(volume, size=like.shape[2:], mode="trilinear", align_corners=False)


def check_shape(image: torch.Tensor, multiple: int, name: str) -> None:
    """Raise ValueError unless ``image`` is (N, 1, D, H, W) with every spatial size a multiple of ``multiple``."""
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"{name} expects images (N, 1, D, H, W), got {tuple(image.shape)}")
    if any(int(n) % multiple for n in image.shape[2:]):
        raise ValueError(f"{name} needs spatial sizes that are multiples of {multiple}, got {tuple(image.shape[2:])}: "
                         "pad the images (the learned methods do this)")


def flow_to_displacement(flow: torch.Tensor, integrate_steps: int, output_level: int) -> torch.Tensor:
    """The network's output: ``flow`` (a velocity integrated by ``integrate_steps`` squarings when
    > 0, else a displacement) predicted on the grid halved ``output_level`` times, upsampled to the
    input grid (voxel units rescaled with the grid)."""
    if integrate_steps > 0:
        flow = integrate_velocity(flow, integrate_steps)
    return upsample_field(flow, 2 ** output_level)
