"""Training pairs from the user's own volumes: a folder or a CSV list, label maps optional.

Every volume is read with the engine's readers (any format ``dinoreg register`` reads), resampled
(linear; labels nearest) to ``spacing_mm`` isotropic voxels in its own orientation, normalised to
[0, 1] like at inference (1st-99th percentile of the foreground), and cropped or zero-padded
around its centre to one common shape (the largest, rounded up to ``multiple``). Pairs are two
different volumes drawn at random. The volumes should be affinely pre-aligned (as the engine's
affine stage does before a learned method runs); the optional ``random_deformation`` adds a random
diffeomorphism to each side as augmentation.

CSV format: a header with ``image`` and optionally ``labels`` columns; paths relative to the CSV.
Folder format: every image file in the folder; label maps in ``labels_path`` with the same file name.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dinoreg.core.transforms import Transform, warp_volume
from dinoreg.data.brain_pairs import normalise_foreground
from dinoreg.data.deformations import integrate_velocity, random_velocity, warp
from dinoreg.data.pairs import LabelledPair, TrainingPair
from dinoreg.errors import InputError
from dinoreg.io.volumes import read_label_volume, read_volume

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh")


@dataclass
class VolumeEntry:
    """One training volume and its optional label map (paths)."""

    image: Path
    labels: Optional[Path] = None


def folder_entries(folder: str | Path, labels_folder: str | Path = "") -> list[VolumeEntry]:
    """Every image file in ``folder`` (sorted), with the same-named label map from ``labels_folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"training folder {folder} does not exist: give a folder of images (NIfTI, NRRD, MHA, MGZ)")
    images = sorted(p for p in folder.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
    if len(images) < 2:
        raise InputError(f"training folder {folder} holds {len(images)} image(s): registration training needs at least 2")
    labels = Path(labels_folder) if labels_folder else None
    return [VolumeEntry(p, (labels / p.name) if labels and (labels / p.name).exists() else None) for p in images]


def csv_entries(path: str | Path) -> list[VolumeEntry]:
    """Entries of a CSV list with columns ``image`` and optionally ``labels`` (relative to the CSV)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training list {path} does not exist: give a CSV file with an 'image' column")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image" not in rows[0]:
        raise InputError(f"training list {path} needs a header with an 'image' column (and optionally 'labels')")
    entries = [VolumeEntry(path.parent / row["image"], (path.parent / row["labels"]) if row.get("labels") else None) for row in rows]
    missing = [str(e.image) for e in entries if not e.image.exists()]
    if missing:
        raise InputError(f"training list {path} names a missing image {missing[0]}: fix the path (relative to the CSV)")
    return entries


def load_resampled(entry: VolumeEntry, spacing_mm: float) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Image (float32, normalised) and label map (int64 or None) at ``spacing_mm``, array order [k, j, i]."""
    image = read_volume(entry.image, "training image")
    grid = image.grid.with_spacing(spacing_mm)
    resampled = warp_volume(image, Transform([]), grid).array.astype(np.float32)
    labels = None
    if entry.labels is not None:
        label_volume = read_label_volume(entry.labels, image, "training label map")
        labels = warp_volume(label_volume, Transform([]), grid, mode="nearest").array.astype(np.int64)
    normalised = normalise_foreground(torch.from_numpy(resampled)[None, None])[0, 0].numpy()
    return normalised, labels


def centre_crop_or_pad(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The centred box of ``shape``, zero-padded where ``array`` is smaller."""
    out = np.zeros(tuple(shape), dtype=array.dtype)
    src, dst = [], []
    for have, want in zip(array.shape, shape):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = array[tuple(src)]
    return out


class VolumePairSampler:
    """Random pairs of different volumes from a list, all on one padded shape (held in memory)."""

    def __init__(self, entries: Sequence[VolumeEntry], spacing_mm: float, multiple: int = 16,
                 random_deformation_voxels: float = 0.0, device: torch.device | str = "cpu") -> None:
        loaded = [load_resampled(e, spacing_mm) for e in entries]
        shape = np.max([image.shape for image, _ in loaded], axis=0)
        self.shape = tuple(int(np.ceil(s / multiple) * multiple) for s in shape)
        self.images = [torch.from_numpy(centre_crop_or_pad(img, self.shape))[None, None].to(device) for img, _ in loaded]
        self.labels = [None if lab is None else torch.from_numpy(centre_crop_or_pad(lab, self.shape))[None, None].to(device)
                       for _, lab in loaded]
        self.has_labels = all(lab is not None for lab in self.labels)
        found = sorted({int(v) for lab in self.labels if lab is not None for v in torch.unique(lab).tolist()} - {0})
        self.label_ids = found
        self.random_deformation_voxels = random_deformation_voxels

    def sample(self, generator: torch.Generator) -> TrainingPair:
        count = len(self.images)
        first = int(torch.randint(count, (), generator=generator, device=generator.device))
        second = (first + 1 + int(torch.randint(count - 1, (), generator=generator, device=generator.device))) % count
        images, labels = [], []
        for index in (first, second):
            image, label = self.images[index], self.labels[index] if self.has_labels else None
            if self.random_deformation_voxels > 0:
                field = integrate_velocity(random_velocity(self.shape, self.random_deformation_voxels, generator,
                                                           device=image.device), steps=5)
                image = warp(image, field)
                label = None if label is None else warp(label, field, mode="nearest")
            images.append(image)
            labels.append(label)
        return TrainingPair(images[0], images[1], labels[0], labels[1])

    def labelled_pairs(self, count: int = 4) -> list:
        """Fixed validation pairs (volume i <- volume i+1) for ``run.validation = "data"``."""
        pairs = []
        for i in range(min(count, len(self.images) - 1)):
            if self.labels[i] is None or self.labels[i + 1] is None:
                continue
            pairs.append(LabelledPair(f"volume{i}<-volume{i + 1}", self.images[i][0, 0].cpu().numpy(),
                                      self.images[i + 1][0, 0].cpu().numpy(), self.labels[i][0, 0].cpu().numpy(),
                                      self.labels[i + 1][0, 0].cpu().numpy()))
        return pairs
