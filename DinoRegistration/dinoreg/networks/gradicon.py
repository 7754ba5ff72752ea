"""uniGradICON / multiGradICON (Tian et al., MICCAI 2024; Demir et al., 2024): the GradICON
multi-resolution network, written here so that the authors' weight files (``Step_2_final.trch``,
a plain ``torch.save`` of their registration network's state dict) load unchanged.

Why our own module and not the reference package at run time: ``unigradicon`` pulls ITK,
torchvision and tensorboard, and builds the training loss (with random noise) on every forward.
The reference (``pip install unigradicon``) is the test oracle: ``Testing/test_gradicon.py`` loads
the same random weights into both and compares the fields.

Architecture (module names are those of the authors' state dict, so ``load_state_dict`` is strict):

- ``UNet2``: 5 stride-2 convolutions down (channels 2 -> 16 -> 32 -> 64 -> 256 -> 512, each added
  to an average-pooled, channel-cropped copy of its input), 5 transposed convolutions up (added to a
  trilinearly doubled copy, then batch norm, cropped, concatenated with the skip), a last 3x3x3
  convolution to 3 channels, divided by 10: a displacement in map units (see below).
- ``VectorFieldStep`` (``net``): the UNet's output as a displacement field.
- ``HalfResolution`` (``net``): runs its child on both images average-pooled by 2 (ceil mode).
- ``TwoStep`` (``netPhi``, ``netPsi``): ``phi`` from the pair, then ``psi`` from (moving warped by
  ``phi``, fixed); the result is ``phi o psi``.

The full network (``include_last_step``) is
``TwoStep(TwoStep(Half(TwoStep(Half(Step), Step)), Step), Step)``: fields at 1/4, 1/2 and full
resolution, then a second full-resolution step.

Coordinates ("map units"): a point of a volume of shape ``(D, H, W)`` is ``(d, h, w)`` scaled to
[0, 1] per axis as ``index / (size - 1)``; a map ``phi`` takes fixed points to moving points. Fields
are sampled trilinearly with ``align_corners=True`` and border padding. As in the reference, a
field applied to the identity grid of its own shape is added directly (not interpolated).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: map of the fixed volume's points (coords (1, 3, D, H, W), map units) to the moving volume's
MapFn = Callable[[torch.Tensor, bool], torch.Tensor]

INPUT_SHAPE = (175, 175, 175)  # the published models' input size (D, H, W)
DOWN_CHANNELS = (2, 16, 32, 64, 256, 512)
UP_CHANNELS = (16, 32, 64, 128, 256)


def identity_coordinates(shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Identity map ``(1, 3, D, H, W)`` in map units (index / (size - 1), float32; computed in float64)."""
    axes = [torch.arange(n, dtype=torch.float64, device=device) * (1.0 / (n - 1)) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].float()


def sample(volume: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """``volume`` (1, C, D, H, W) at ``coordinates`` (1, 3, ...) in map units: trilinear, border padding."""
    grid = (coordinates * 2.0 - 1.0).flip(1).permute(0, 2, 3, 4, 1)  # grid_sample wants (x=W, y=H, z=D) last
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The first ``channels`` channels of ``x``, zero channels put in front when ``x`` has fewer."""
    x = x[:, :channels]
    missing = channels - x.shape[1]
    return F.pad(x, (0, 0, 0, 0, 0, 0, missing, 0)) if missing > 0 else x


class UNet2(nn.Module):
    """The GradICON U-Net: (moving, fixed) ``(1, 1, D, H, W)`` -> displacement ``(1, 3, D, H, W)`` in map units."""

    def __init__(self) -> None:
        super().__init__()
        down, up = DOWN_CHANNELS, UP_CHANNELS
        up_in = [down[i + 1] + (up[i + 1] if i + 1 < len(up) else 0) for i in range(len(up))]
        self.downConvs = nn.ModuleList(nn.Conv3d(down[i], down[i + 1], 3, stride=2, padding=1) for i in range(len(up)))
        self.upConvs = nn.ModuleList(nn.ConvTranspose3d(up_in[i], up[i], 4, stride=2, padding=1) for i in range(len(up)))
        self.batchNorms = nn.ModuleList(nn.BatchNorm3d(up[i]) for i in range(len(up)))
        self.lastConv = nn.Conv3d(down[0] + up[0], 3, 3, padding=1)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([moving, fixed], 1)
        skips = []
        for conv in self.downConvs:
            skips.append(x)
            y = conv(F.leaky_relu(x))
            x = y + _match_channels(F.avg_pool3d(x, 2, ceil_mode=True), y.shape[1])
        for depth in reversed(range(len(self.upConvs))):
            y = self.upConvs[depth](F.leaky_relu(x))
            x = y + F.interpolate(_match_channels(x, y.shape[1]), scale_factor=2, mode="trilinear", align_corners=False)
            x = self.batchNorms[depth](x)
            skip = skips[depth]
            x = torch.cat([x[:, :, :skip.shape[2], :skip.shape[3], :skip.shape[4]], skip], 1)
        return self.lastConv(x) / 10


class VectorFieldStep(nn.Module):
    """One network whose output is the displacement: ``phi(x) = x + u(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = UNet2()

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> MapFn:
        displacement = self.net(moving, fixed)

        def phi(points: torch.Tensor, is_identity: bool) -> torch.Tensor:
            if is_identity and points.shape == displacement.shape:
                return points + displacement
            return points + sample(displacement, points)

        return phi


class HalfResolution(nn.Module):
    """Its child registers both images average-pooled by 2 (ceil mode); the map is resolution-free."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> MapFn:
        return self.net(F.avg_pool3d(moving, 2, ceil_mode=True), F.avg_pool3d(fixed, 2, ceil_mode=True))


class TwoStep(nn.Module):
    """``phi`` from the pair, ``psi`` from (moving warped by ``phi``, fixed); returns ``phi o psi``."""

    def __init__(self, netPhi: nn.Module, netPsi: nn.Module) -> None:  # noqa: N803 (the authors' key names)
        super().__init__()
        self.netPhi = netPhi
        self.netPsi = netPsi

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> MapFn:
        phi = self.netPhi(moving, fixed)
        identity = identity_coordinates(tuple(moving.shape[2:]), moving.device)
        psi = self.netPsi(sample(moving, phi(identity, True)), fixed)
        return lambda points, is_identity: phi(psi(points, is_identity), False)


class GradICON(nn.Module):
    """The published uniGradICON / multiGradICON network (same state-dict keys as the authors' files).

    ``forward(moving, fixed)`` takes both images ``(1, 1, D, H, W)`` on the network grid (the
    published models: 175^3, intensities in [0, 1]) and returns the displacement of fixed-grid
    voxels ``(1, 3, D, H, W)`` in network voxels (channel c along tensor axis c + 2): the moving
    point of fixed voxel ``n`` is ``n + u(n)``.
    """

    shape_multiple = 1

    def __init__(self, include_last_step: bool = True) -> None:
        super().__init__()
        net: nn.Module = VectorFieldStep()
        for _ in range(2):
            net = TwoStep(HalfResolution(net), VectorFieldStep())
        if include_last_step:
            net = TwoStep(net, VectorFieldStep())
        self.netPhi, self.netPsi = net.netPhi, net.netPsi  # the authors' top-level keys

    def maps(self, moving: torch.Tensor, fixed: torch.Tensor) -> MapFn:
        """The map (fixed points -> moving points, map units) the network predicts for the pair."""
        if moving.shape != fixed.shape or moving.dim() != 5:
            raise ValueError(f"GradICON takes two (1, 1, D, H, W) images of one shape, got {tuple(moving.shape)} "
                             f"and {tuple(fixed.shape)}")
        return TwoStep.forward(self, moving, fixed)  # this module is the outer TwoStep

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        phi = self.maps(moving, fixed)
        shape = tuple(moving.shape[2:])
        identity = identity_coordinates(shape, moving.device)
        scale = torch.tensor([n - 1 for n in shape], dtype=identity.dtype, device=identity.device).view(1, 3, 1, 1, 1)
        return (phi(identity, True) - identity) * scale


def load_gradicon(path: str, device: torch.device | str = "cpu") -> GradICON:
    """The network with the authors' weight file ``path`` (a torch state dict; read with ``weights_only``)."""
    network = GradICON()
    state = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    return network.to(device).eval()


# ---------------------------------------------------------------------- the authors' loss (instance optimisation)

def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian of ``4 sigma + 1`` taps (the reference's LNCC window)."""
    size = int(sigma * 4 + 1)
    half = (size - 1) * 0.5
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, steps=size) / sigma) ** 2)
    return taps / taps.sum()


def blur(volume: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 1, D, H, W)`` with zero padding ("same" size)."""
    k = kernel.to(volume.device, volume.dtype)
    for shape in ((-1, 1, 1), (1, -1, 1), (1, 1, -1)):
        volume = F.conv3d(volume, k.view(1, 1, *shape), padding="same")
    return volume


def lncc_loss(warped: torch.Tensor, target: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """1 - mean local normalised cross-correlation with Gaussian windows (the reference's ``LNCC``)."""
    kernel = gaussian_kernel(sigma)
    mean_w, mean_t = blur(warped, kernel), blur(target, kernel)
    covariance = blur(warped * target, kernel) - mean_w * mean_t
    variance_w = torch.relu(blur(warped * warped, kernel) - mean_w ** 2) + 1e-5
    variance_t = torch.relu(blur(target * target, kernel) - mean_t ** 2) + 1e-5
    return 1 - torch.mean(covariance / torch.sqrt(variance_w * variance_t))


def gradicon_loss(network: GradICON, moving: torch.Tensor, fixed: torch.Tensor, lmbda: float = 1.5,
                  sigma: float = 5.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The published models' training (and instance optimisation) objective, symmetric in the pair.

    ``LNCC(moving o phi_AB, fixed) + LNCC(fixed o phi_BA, moving)`` (zero outside the images) plus
    ``lmbda`` times the gradient inverse-consistency penalty: the squared finite-difference
    (step 0.001 map units) Jacobian of ``phi_AB o phi_BA - id`` at every other voxel of the identity
    perturbed by Gaussian noise of 2 / W map units (W: the last axis' size).
    """
    shape = tuple(moving.shape[2:])
    identity = identity_coordinates(shape, moving.device)
    phi_ab, phi_ba = network.maps(moving, fixed), network.maps(fixed, moving)

    def warp_zero(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        grid = (points * 2.0 - 1.0).flip(1).permute(0, 2, 3, 4, 1)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    similarity = lncc_loss(warp_zero(moving, phi_ab(identity, True)), fixed, sigma) \
        + lncc_loss(warp_zero(fixed, phi_ba(identity, True)), moving, sigma)
    noise = torch.randn(identity.shape, generator=generator).to(moving.device)
    points = (identity + 2 * noise / shape[-1])[:, :, ::2, ::2, ::2]
    error = points - phi_ab(phi_ba(points, False), False)
    delta = 0.001
    penalty = torch.zeros((), device=moving.device)
    for axis in range(3):
        step = torch.zeros((1, 3, 1, 1, 1), device=moving.device)
        step[0, axis] = delta
        moved = points + step
        error_step = moved - phi_ab(phi_ba(moved, False), False)
        penalty = penalty + torch.mean(((error - error_step) / delta) ** 2)
    return lmbda * penalty + similarity
