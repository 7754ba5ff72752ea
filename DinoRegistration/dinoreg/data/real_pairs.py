"""The real labelled brain pair used for validation (never for training).

- ``oasis``: voxelmorph's OASIS-derived scan ``brain/test_scan.npz`` (``vol`` in [0, 1], ``seg``
  FreeSurfer aseg ids), 160x192x224, 1 mm, LIA voxel order (see :mod:`.synthesis`);
- ``mne``: MNE's sample subject, ``brain/mne_sample_brain.mgz`` (skull-stripped T1, 256^3 1 mm LIA)
  with ``mne_sample_aseg_3mm.mgz`` resampled nearest-neighbour onto the brain's grid through both
  headers, cropped to 160x192x224 around the brain.

Both directions (oasis <- mne and mne <- oasis) are validation pairs. The moving subject is
aligned to the fixed one by the engine's affine stage (as ``dinoreg register`` does) and resampled
onto the fixed grid once; the result is cached as ``.npz``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinoreg.data import synthesis
from dinoreg.progress import Progress

PAIR_NAMES = ("oasis<-mne", "mne<-oasis")


@dataclass
class RealPair:
    """Fixed and affinely pre-aligned moving (LIA arrays on the fixed 1 mm grid) with their labels."""

    name: str
    fixed: np.ndarray
    moving: np.ndarray
    fixed_labels: np.ndarray
    moving_labels: np.ndarray


def oasis_subject() -> tuple[np.ndarray, np.ndarray]:
    """OASIS image (float32, [0, 1]) and its EVAL_LABELS label map, LIA 160x192x224."""
    data = np.load(synthesis.VOXELMORPH_SCAN)
    labels = np.round(data["seg"]).astype(np.int16)
    labels[~np.isin(labels, synthesis.EVAL_LABELS)] = 0
    return data["vol"].astype(np.float32), labels


def mne_subject() -> tuple[np.ndarray, np.ndarray]:
    """MNE sample T1 (float32, [0, 1]) and its aseg on the 1 mm grid (EVAL_LABELS), LIA 160x192x224."""
    import nibabel as nib  # lazy: only for NIfTI/MGZ header checks
    from scipy import ndimage  # lazy: only for this computation

    folder = synthesis.SHARED_DATA / "brain"
    brain = nib.load(str(folder / "mne_sample_brain.mgz"))
    aseg = nib.load(str(folder / "mne_sample_aseg_3mm.mgz"))
    if nib.aff2axcodes(brain.affine) != ("L", "I", "A"):
        raise ValueError("mne_sample_brain.mgz is expected in FreeSurfer's conformed LIA orientation")
    image = np.asarray(brain.dataobj).astype(np.float32)
    brain_to_aseg = np.linalg.inv(aseg.affine) @ brain.affine
    labels = ndimage.affine_transform(np.asarray(aseg.dataobj).astype(np.int16), brain_to_aseg[:3, :3],
                                      brain_to_aseg[:3, 3], output_shape=image.shape, order=0)
    labels[~np.isin(labels, synthesis.EVAL_LABELS)] = 0
    box = np.argwhere(image > 0)
    centre = (box.min(0) + box.max(0)) / 2.0
    image = synthesis.crop_or_pad(image, centre, synthesis.CROP_SHAPE)
    labels = synthesis.crop_or_pad(labels, centre, synthesis.CROP_SHAPE)
    return image / max(float(np.percentile(image[image > 0], 99.9)), 1e-6), labels


def align(fixed: np.ndarray, moving: np.ndarray, moving_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moving image and labels resampled onto the fixed grid after the engine's affine stage."""
    from dinoreg.core.transforms import warp_volume  # lazy: imports torch

    fixed_volume, moving_volume = synthesis.lia_volume(fixed), synthesis.lia_volume(moving)
    transform = affine_transform(fixed_volume, moving_volume)
    image = warp_volume(moving_volume, transform, fixed_volume.grid)
    labels = warp_volume(synthesis.lia_volume(moving_labels), transform, fixed_volume.grid, mode="nearest")
    return image.array.transpose(2, 1, 0).copy(), labels.array.transpose(2, 1, 0).copy()


def affine_transform(fixed, moving):
    """The engine's rigid-then-affine stage (fixed -> moving), as ``dinoreg register`` runs it."""
    import SimpleITK as sitk  # lazy: not needed to start this command

    from dinoreg.optim import affine  # lazy: imports torch

    try:
        return affine.affine_registration(fixed, moving, Progress())
    except AttributeError:
        # SimpleITK 2.2 returns generic ``sitk.Transform`` objects (no GetCenter) where the engine
        # expects an Euler3DTransform: the same stages with the transform downcast
        settings = affine.AffineSettings()
        images = affine.to_float_image(fixed, settings.working_spacing_mm), affine.to_float_image(moving, settings.working_spacing_mm)
        rigid = affine.moments_initialisation(*images).Downcast()
        rigid = affine.run_stage(*images, rigid, settings.rigid_iterations, settings, (None, None), Progress(), (0.0, 0.5)).Downcast()
        matrix = sitk.AffineTransform(3)
        matrix.SetCenter(rigid.GetCenter())
        matrix.SetMatrix(rigid.GetMatrix())
        matrix.SetTranslation(rigid.GetTranslation())
        matrix = affine.run_stage(*images, matrix, settings.affine_iterations, settings, (None, None), Progress(), (0.5, 1.0))
        from dinoreg.core.transforms import Transform  # lazy: imports torch

        return Transform([affine.sitk_part_to_step(matrix.Downcast() if hasattr(matrix, "Downcast") else matrix)])


def real_pairs(cache: Path) -> list[RealPair]:
    """Both directions of the OASIS / MNE pair, affinely pre-aligned (cached in ``cache``)."""
    path = cache / f"real_pairs_v{synthesis.SYNTH_VERSION}.npz"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        oasis, mne = oasis_subject(), mne_subject()
        arrays = {}
        for name, (fixed, fixed_labels), (moving, moving_labels) in (("oasis<-mne", oasis, mne), ("mne<-oasis", mne, oasis)):
            warped, warped_labels = align(fixed, moving, moving_labels)
            key = name.replace("<-", "_from_")
            arrays.update({f"{key}_fixed": fixed, f"{key}_moving": warped.astype(np.float32),
                           f"{key}_fixed_labels": fixed_labels, f"{key}_moving_labels": warped_labels.astype(np.int16)})
        partial = path.with_suffix(".partial.npz")
        np.savez_compressed(partial, **arrays)
        partial.replace(path)
    data = np.load(path)
    pairs = []
    for name in PAIR_NAMES:
        key = name.replace("<-", "_from_")
        pairs.append(RealPair(name, data[f"{key}_fixed"], data[f"{key}_moving"], data[f"{key}_fixed_labels"],
                              data[f"{key}_moving_labels"]))
    return pairs
