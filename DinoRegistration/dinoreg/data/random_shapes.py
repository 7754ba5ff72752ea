"""Random-shape image pairs for pretraining (the pretraining source's generator, on the fly).

A label map of ``n_shapes`` random blobs is the argmax of ``n_shapes`` channels of smooth noise;
each blob gets a constant intensity (uniform in 25..225 of 255); the pair is the image warped by two
independent random diffeomorphisms (smooth velocity fields integrated by scaling-and-squaring).
Images are min-max scaled to [0, 1]; the warped label maps come along for Dice supervision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from dinoreg.data.deformations import integrate_velocity, random_velocity, smooth_noise, uniform, warp
from dinoreg.data.pairs import TrainingPair


@dataclass
class RandomShapeSettings:
    """Knobs of the generator (voxel units of the training grid)."""

    n_shapes: int = 16
    #: size of the noise cells that make the shapes (two octaves: this and half of it)
    shape_cell_voxels: float = 24.0
    #: largest velocity component in voxels (the source: 4-18 voxels at 112^3)
    max_velocity_voxels: float = 8.0
    blur_sigma_voxels: float = 0.5
    noise_std: float = 0.02


def random_shape_labels(shape: Sequence[int], settings: RandomShapeSettings, generator: torch.Generator,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Label map ``(1, 1, *shape)`` (int64, values 0..n_shapes-1): argmax of smooth noise channels."""
    noise = smooth_noise(shape, settings.n_shapes, settings.shape_cell_voxels, generator, device)
    noise = noise + 0.5 * smooth_noise(shape, settings.n_shapes, settings.shape_cell_voxels / 2, generator, device)
    return noise.argmax(dim=1, keepdim=True)


def gaussian_blur(image: torch.Tensor, sigma_voxels: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, D, H, W)`` (written here: three 1D convolutions are all it takes)."""
    if sigma_voxels <= 0.05:
        return image
    radius = max(1, int(round(2.5 * sigma_voxels)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma_voxels) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    out = image
    for axis in range(3):
        view = [1, 1, 1]
        view[axis] = -1
        weight = kernel.view(1, 1, *view).repeat(channels, 1, 1, 1, 1)
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(out, weight, padding=tuple(padding), groups=channels)
    return out


def min_max(image: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] per sample."""
    low = image.flatten(1).amin(dim=1).view(-1, 1, 1, 1, 1)
    high = image.flatten(1).amax(dim=1).view(-1, 1, 1, 1, 1)
    return (image - low) / (high - low).clamp(min=1e-6)


def random_shape_pair(shape: Sequence[int], generator: torch.Generator, settings: RandomShapeSettings | None = None,
                      device: torch.device | str = "cpu") -> TrainingPair:
    """One fixed/moving pair of random shapes with their label maps (batch of 1)."""
    settings = settings or RandomShapeSettings()
    labels = random_shape_labels(shape, settings, generator, device)
    intensities = torch.rand(settings.n_shapes, generator=generator, device=device) * 200.0 + 25.0
    image = intensities[labels]
    images, label_maps = [], []
    for _ in range(2):
        velocity = random_velocity(shape, settings.max_velocity_voxels, generator, device=device)
        displacement = integrate_velocity(velocity, steps=5)
        warped = warp(image, displacement)
        warped = gaussian_blur(warped, uniform(generator, 0.0, settings.blur_sigma_voxels))
        warped = warped / 255.0 + settings.noise_std * torch.randn(warped.shape, generator=generator, device=device)
        images.append(min_max(warped))
        label_maps.append(warp(labels.float(), displacement, mode="nearest").long())
    return TrainingPair(images[0], images[1], label_maps[0], label_maps[1])
