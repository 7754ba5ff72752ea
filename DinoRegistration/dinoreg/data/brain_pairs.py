"""T1-like brain pairs synthesised on the fly from the SynthSeg label maps (SynthMorph-style).

Each sample takes two label maps (two subjects, or one subject twice), deforms each by a random
small affine plus a random diffeomorphism, then synthesises an image from each deformed label map
with the tissue table of :mod:`.synthesis` (the benchmark's generator) with wider random jitter,
or (with probability ``random_contrast``) fully random per-tissue intensities, so the network
learns anatomy rather than one contrast. Label maps come as FreeSurfer ids (DICE_LABELS, 0 elsewhere):
the training loss is Dice between the warped moving labels and the fixed labels plus an image
similarity.

The label maps are prepared once (LIA, cropped to the benchmark's 160x192x224 box around the brain,
then sampled at ``spacing_mm`` by taking every n-th voxel) and cached as ``.npz`` in a folder.

Why not torchio here: the deformation (affine + velocity) is one composed field applied once to the
labels, and the synthesis is a lookup table plus a few convolutions; doing both in torch keeps it
batched and on the GPU when one is used, where torchio's transforms run per subject on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.core.geometry import compose, invert, resize_field
from dinoreg.core.affine_map import AffineMap
from dinoreg.core.transforms import Transform, warp_volume
from dinoreg.core.volume import Grid, Volume
from dinoreg.data import synthesis
from dinoreg.data.deformations import (affine_displacement, integrate_velocity, random_affine_matrix, random_velocity,
                                       smooth_noise, uniform, warp)
from dinoreg.data.pairs import TrainingPair
from dinoreg.data.random_shapes import gaussian_blur
from dinoreg.data.real_pairs import affine_transform

#: tissue classes in a fixed order (index = class id used by the lookup tables)
TISSUES: list[str] = list(synthesis.TISSUE_T1_MEAN)
#: FreeSurfer ids scored by the Dice loss (the benchmark's 31 evaluation structures)
DICE_LABELS: list[int] = list(synthesis.EVAL_LABELS)


@dataclass
class BrainSynthSettings:
    """Knobs of the on-the-fly synthesis (deformations in mm, blur in voxels of the training grid)."""

    #: probability of fully random per-tissue intensities instead of the jittered T1 table
    random_contrast: float = 0.3
    #: share of pairs made from ONE label map deformed twice: their true displacement is known
    #: (``TrainingPair.displacement``), a dense supervised signal that trains much faster than Dice
    same_subject: float = 0.0
    mean_jitter: float = 0.15
    max_within_class_cv: float = 0.10
    max_blur_sigma_voxels: float = 0.6
    max_bias_std: float = 0.2
    max_noise_std: float = 0.03
    #: small: the maps are moment-aligned and real pairs are affinely aligned before the network
    max_rotation_deg: float = 3.0
    max_scaling: float = 0.03
    max_translation_mm: float = 3.0
    max_velocity_mm: float = 6.0


@dataclass
class LabelMap:
    """One subject prepared for synthesis: generation labels and the skull-stripping mask (LIA, training grid)."""

    name: str
    labels: torch.Tensor  # (1, 1, D, H, W) int64, SynthSeg generation ids
    mask: torch.Tensor    # (1, 1, D, H, W) float, 1 inside the brain


def lia_grid_volume(array_lia: np.ndarray, step: int, full_shape: tuple[int, ...]) -> "Volume":
    """Every ``step``-th voxel of a 1 mm LIA box of ``full_shape`` (centred like ``synthesis.lia_volume``)."""
    origin = -synthesis.LIA_DIRECTION_LPS @ ((np.asarray(full_shape, dtype=np.float64) - 1.0) / 2.0)
    grid = Grid(tuple(array_lia.shape), origin, np.full(3, float(step)), synthesis.LIA_DIRECTION_LPS)
    return Volume(np.ascontiguousarray(array_lia.transpose(2, 1, 0)), grid)


def reference_alignment(number: int, labels: np.ndarray, reference: np.ndarray, cache: Path) -> "Transform":
    """Affine (reference -> subject, LPS mm) of the engine's affine stage between T1 images
    synthesised at 2 mm from the two label maps; cached as a 4x4 matrix (any training spacing)."""
    path = cache / f"synthseg{number:02d}_to_01_affine_v{synthesis.SYNTH_VERSION}.npy"
    if not path.exists():
        fixed = lia_grid_volume(synthesis.synthesize_t1(reference[::2, ::2, ::2], seed=1), 2, reference.shape)
        moving = lia_grid_volume(synthesis.synthesize_t1(labels[::2, ::2, ::2], seed=2), 2, labels.shape)
        step = affine_transform(fixed, moving).steps[0]
        partial = path.with_name(path.name + ".partial.npy")
        np.save(partial, step.homogeneous)
        partial.replace(path)
    return Transform([AffineMap.from_homogeneous(np.load(path))])


def load_cropped(number: int) -> tuple[np.ndarray, np.ndarray]:
    """Generation labels (LIA, cropped to the benchmark box around the brain) and their brain mask."""
    labels = synthesis.load_lia_labels(synthesis.SYNTHSEG_DIR / f"training_seg_{number:02d}.nii.gz")
    box = np.argwhere(~np.isin(labels, list(synthesis.NOT_BRAIN)))
    labels = synthesis.crop_or_pad(labels, (box.min(0) + box.max(0)) / 2.0, synthesis.CROP_SHAPE)
    return labels, synthesis.brain_mask(labels)


def prepare_label_map(number: int, spacing_mm: int, cache: Path) -> LabelMap:
    """SynthSeg subject ``number`` (1..20) at ``spacing_mm`` (an integer: every n-th voxel), cached.

    Every subject is affinely aligned to subject 1 first (the engine's affine stage on synthesised
    T1 images), so pairs start as roughly aligned as real pairs after the affine stage.
    """
    path = cache / f"synthseg{number:02d}_{spacing_mm}mm_aligned_v{synthesis.SYNTH_VERSION}.npz"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        step = int(spacing_mm)
        labels, mask = load_cropped(number)
        reference = load_cropped(1)[0] if number != 1 else labels
        target = lia_grid_volume(reference[::step, ::step, ::step], step, reference.shape).grid
        transform = reference_alignment(number, labels, reference, cache) if number != 1 else None
        out = []
        for array in (labels.astype(np.int16), mask.astype(np.uint8)):
            if transform is None:
                out.append(array[::step, ::step, ::step])
            else:
                source = lia_grid_volume(array, 1, array.shape)
                out.append(warp_volume(source, transform, target, mode="nearest").array.transpose(2, 1, 0))
        partial = path.with_suffix(".partial.npz")
        np.savez_compressed(partial, labels=out[0], mask=out[1] > 0)
        partial.replace(path)
    data = np.load(path)
    return LabelMap(f"synthseg{number:02d}", torch.from_numpy(data["labels"].astype(np.int64))[None, None],
                    torch.from_numpy(data["mask"].astype(np.float32))[None, None])


def lookup_tables(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Generation id -> tissue class index, and generation id -> FreeSurfer id of DICE_LABELS (else 0)."""
    size = max(synthesis.LABEL_TISSUE) + 1
    tissue = torch.zeros(size, dtype=torch.long)
    for label, name in synthesis.LABEL_TISSUE.items():
        tissue[label] = TISSUES.index(name)
    source = np.load(synthesis.SYNTHSEG_DIR / "generation_labels.npy").astype(int)
    target = np.load(synthesis.SYNTHSEG_DIR / "synthseg_segmentation_labels.npy").astype(int)
    dice = torch.zeros(size, dtype=torch.long)
    for gen, seg in zip(source, target):
        if seg in DICE_LABELS and gen < size:
            dice[gen] = seg
    return tissue.to(device), dice.to(device)


def deform_label_map(subject: LabelMap, settings: BrainSynthSettings, generator: torch.Generator,
                     spacing_mm: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels and mask warped by a random affine composed with a random diffeomorphism.

    The velocity field is drawn and integrated at half resolution (it is smooth at that scale; 8x
    cheaper), then resized; labels and mask are resampled once, nearest-neighbour, together.
    """
    device = subject.labels.device
    shape = tuple(subject.labels.shape[2:])
    half = tuple(max(2, s // 2) for s in shape)
    matrix = random_affine_matrix(generator, settings.max_rotation_deg, settings.max_scaling,
                                  settings.max_translation_mm / spacing_mm, shape)
    cells = (32.0 / spacing_mm, 16.0 / spacing_mm)  # 64 mm and 32 mm features on the half-resolution grid
    velocity = random_velocity(half, settings.max_velocity_mm / spacing_mm / 2, generator, cell_voxels=cells, device=device)
    displacement = resize_field(integrate_velocity(velocity, steps=5), shape)
    # x -> A(x + phi(x)): the diffeomorphism first, then the affine (one resampling of the labels)
    affine = affine_displacement(matrix, shape, device)
    total = displacement + warp(affine, displacement)
    both = warp(torch.cat([subject.labels.float(), subject.mask], dim=1), total, mode="nearest")
    return both[:, :1].to(torch.int64), both[:, 1:], total


def synthesise_image(labels: torch.Tensor, mask: torch.Tensor, tissue_lut: torch.Tensor, settings: BrainSynthSettings,
                     generator: torch.Generator) -> torch.Tensor:
    """A T1-like (or random-contrast) image ``(1, 1, D, H, W)`` in [0, 1] from generation labels."""
    device = labels.device
    base = torch.tensor([synthesis.TISSUE_T1_MEAN[name] for name in TISSUES], device=device) / 110.0
    if uniform(generator, 0.0, 1.0) < settings.random_contrast:
        means = torch.rand(len(TISSUES), generator=generator, device=device)
    else:
        means = base * (1.0 + settings.mean_jitter * torch.randn(len(TISSUES), generator=generator, device=device))
    classes = tissue_lut[labels.clamp(max=tissue_lut.numel() - 1)]
    mean = means[classes]
    cv = uniform(generator, 0.0, settings.max_within_class_cv)
    image = mean * (1.0 + cv * torch.randn(mean.shape, generator=generator, device=device))
    image = image * mask
    image = gaussian_blur(image, uniform(generator, 0.0, settings.max_blur_sigma_voxels))
    bias = smooth_noise(tuple(labels.shape[2:]), 1, max(labels.shape[2:]) / 3.0, generator, device)
    image = image * torch.exp(uniform(generator, 0.0, settings.max_bias_std) * bias)
    image = image + uniform(generator, 0.0, settings.max_noise_std) * torch.randn(image.shape, generator=generator, device=device)
    image = image * mask
    return normalise_foreground(image)


def normalise_foreground(image: torch.Tensor, low: float = 1.0, high: float = 99.0) -> torch.Tensor:
    """Clip to the (low, high) percentiles of the voxels above the minimum and scale to [0, 1].

    The same rule as the engine's ``intensity.robust_range`` + ``normalise`` applied at inference.
    """
    out = []
    for sample in image:
        values = sample[sample > sample.min()]
        if values.numel() < 2:
            values = sample.flatten()
        if values.numel() > 2_000_000:
            values = values[:: values.numel() // 2_000_000]
        lo, hi = torch.quantile(values.float(), torch.tensor([low / 100, high / 100], device=values.device))
        out.append(((sample - lo) / (hi - lo).clamp(min=1e-6)).clamp(0.0, 1.0))
    return torch.stack(out)


class BrainPairSampler:
    """Draws synthesised brain pairs from a set of prepared label maps (one generator per rank)."""

    def __init__(self, subjects: Sequence[int], spacing_mm: int, cache: Path, settings: BrainSynthSettings | None = None,
                 device: torch.device | str = "cpu", synthesis_factor: int = 1) -> None:
        """``synthesis_factor`` k > 1: label maps, deformations and images are made at ``spacing_mm / k``
        and the images average-pooled by k, as real images are brought to the training spacing
        (validation) and smoothed before resampling (inference): partial-volume edges instead of
        blocky, nearest-neighbour anatomy. Labels: the centre voxel of each k^3 cell."""
        if int(synthesis_factor) < 1 or int(spacing_mm) % int(synthesis_factor):
            raise ValueError(f"synthesis_factor must divide spacing_mm ({spacing_mm}), got {synthesis_factor}")
        self.factor = int(synthesis_factor)
        fine_mm = int(spacing_mm) // self.factor
        self.maps = [prepare_label_map(n, fine_mm, cache) for n in subjects]
        self.maps = [LabelMap(m.name, m.labels.to(device), m.mask.to(device)) for m in self.maps]
        self.settings = settings or BrainSynthSettings()
        self.tissue_lut, self.dice_lut = lookup_tables(device)
        self.fine_shape = tuple(self.maps[0].labels.shape[2:])
        self.shape = tuple(n // self.factor for n in self.fine_shape)
        self.spacing_mm = float(spacing_mm)
        self.fine_spacing_mm = float(fine_mm)

    def sample(self, generator: torch.Generator) -> TrainingPair:
        """A fixed/moving pair from two different subjects when there are several."""
        count = len(self.maps)
        first = int(torch.randint(count, (), generator=generator, device=generator.device))
        second = first if count == 1 else (first + 1 + int(torch.randint(count - 1, (), generator=generator, device=generator.device))) % count
        same = uniform(generator, 0.0, 1.0) < self.settings.same_subject
        if same:
            second = first
        images, labels, fields = [], [], []
        for index in (first, second):
            warped, mask, field = deform_label_map(self.maps[index], self.settings, generator, self.fine_spacing_mm)
            image = synthesise_image(warped, mask, self.tissue_lut, self.settings, generator)
            dice_labels = self.dice_lut[warped.clamp(max=self.dice_lut.numel() - 1)]
            if self.factor > 1:
                image, dice_labels, field = self.pool(image, dice_labels, field)
            images.append(image)
            labels.append(dice_labels)
            fields.append(field)
        truth = None
        if same:
            # fixed voxel x shows anatomy at x + d1(x); the moving voxel showing it is that point
            # mapped through the inverse of y -> y + d2(y): u = compose(d1, inverse(d2))

            truth = compose(fields[0], invert(fields[1], iterations=20)[0])
        return TrainingPair(images[0], images[1], labels[0], labels[1], truth)

    def pool(self, image: torch.Tensor, labels: torch.Tensor, field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fine image, labels and displacement (fine voxels) to the training grid (``self.factor`` coarser)."""
        k = self.factor
        depth, height, width = (n * k for n in self.shape)
        image = normalise_foreground(F.avg_pool3d(image[..., :depth, :height, :width], k))
        centre = k // 2
        labels = labels[..., centre:depth:k, centre:height:k, centre:width:k]
        field = F.avg_pool3d(field[..., :depth, :height, :width], k) / k
        return image, labels, field
