"""T1-like brain images synthesised from the SynthSeg label maps, and the voxelmorph OASIS scan.

One generator shared by the benchmark (``benchmarks/brain_benchmark.py``: deterministic subjects,
seeded by the subject number and cached as NIfTI in a cache folder, never committed) and training
(``data/brain_pairs.py`` draws a fresh seed per sample, at the training resolution).

Why numpy/scipy and not torchio's ``LabelsToImage`` / ``RandomBiasField`` / ``RandomBlur`` /
``RandomNoise``: the benchmark images must stay bit-identical across versions (``SYNTH_VERSION``)
with the documented tissue table below, which a per-label lookup does in one indexing step;
torchio's label-to-image wants one channel per label (about 50 channels of 256^3) and its random
transforms draw from torch's global generator. Training uses torchio where it fits (random affine
augmentation, ``data/brain_pairs.py``).

Data (see ``../shared/README.md`` for licenses)
-----------------------------------------------
- ``synthseg/training_seg_NN.nii.gz``: 20 real subjects' label maps, 256^3 at 1 mm, FreeSurfer ids
  for the brain plus extra-cerebral ids (502-530: skull, skin, eyes, ...), 24 (all CSF, including
  the whole sulcal/subarachnoid CSF) and a few SynthSeg-specific ids (25/57 WM lesions, 136/137 and
  163/164 ventricle parts). Stored in FreeSurfer's conformed **LIA** orientation.
- ``brain/test_scan.npz``: voxelmorph's OASIS-derived subject, ``vol`` 160x192x224 in [0, 1] and
  ``seg`` (FreeSurfer aseg ids). The shared README says "treat as RAS-aligned", but the labels say
  otherwise: left-hemisphere structures (ids 2, 3) lie at larger axis-0 indices than the right ones
  (41, 42), the cerebellum and brainstem at larger axis-1 indices and the cerebellum at smaller
  axis-2 indices than the cerebrum. The array is a crop of a FreeSurfer conformed volume, i.e. LIA
  (axis 0 -> Left, 1 -> Inferior, 2 -> Anterior), exactly like the SynthSeg maps. Both are given
  that geometry here (``LIA_DIRECTION_LPS``), centred on the physical origin.

Intensity model (how intensities are sampled)
---------------------------------------------
SynthSeg's generator draws, per image and per tissue class, a Gaussian mean and standard deviation
from hyper-priors (``prior_means_t1.npy`` and ``prior_stds_t1.npy``, shape (2, 25): row 0 = mean of
the hyper-prior, row 1 = its spread, one column per *class*), then samples every voxel of the class.
The class of each label comes from ``generation_classes_contrast_specific.npy``, which is NOT in
the shared data: the shipped ``generation_classes.npy`` (54 labels -> 48 classes, left/right apart)
belongs to the uniform-prior, contrast-agnostic set-up and does not index the 25 T1 columns. Guessing
which column is which tissue would be fiction, so this module keeps SynthSeg's *generative model*
but uses an explicit, documented tissue table:

- each label -> one tissue class (``LABEL_TISSUE``; left/right share a class, as in SynthSeg's
  contrast-specific set-up; SynthSeg's extra ids follow its own segmentation mapping
  ``synthseg_segmentation_labels.npy``: 136/163 -> lateral ventricle, 137/164 -> inferior lateral
  ventricle, 25/57 -> WM lesion);
- class mean on a "WM = 110" scale (``TISSUE_T1_MEAN``) = the per-label mean intensity of the real
  OASIS T1 (``test_scan.npz``) relative to its cerebral WM, rounded (pallidum lowered from 110 to 102
  so it stays distinguishable from WM as in raw T1);
- per subject, each class mean is jittered by ``N(0, MEAN_JITTER * mean)`` (5 %: same protocol,
  different scanner/session; SynthSeg's T1 hyper-priors spread about 12 %, which is a different
  contrast each time and beyond what a mono-modal inter-subject benchmark wants);
- voxel intensities ~ ``N(class mean, WITHIN_CLASS_CV * class mean)`` (8 %, texture), then
  a Gaussian blur of ``BLUR_SIGMA_MM`` (0.8 mm: partial volume of a 1 mm acquisition), a smooth
  multiplicative bias field ``exp(b)``, ``b`` a 4x4x4 Gaussian grid (std ``BIAS_STD`` = 0.10) upsampled
  cubically (about +-10-20 % across the brain), and additive Gaussian noise of ``NOISE_STD`` (2 on the
  WM = 110 scale);
- skull-stripped (decided so because the OASIS scan is skull-stripped, as in the voxelmorph/OASIS
  Learn2Reg setting): the brain mask is every brain label (not 0, 24 or the 5xx extra-cerebral ids),
  closed (2 voxels), holes filled, plus the CSF (24) within 1 voxel of it, so the sulcal CSF and a
  thin CSF rim stay dark inside the mask; the background is exactly 0;
- finally divided by the 99.9th percentile inside the mask and clipped to [0, 1] (as the OASIS scan).

Geometry: the LIA array is cropped (or zero-padded) to ``CROP_SHAPE`` = 160x192x224 voxels (the
voxelmorph size) centred on the bounding box of the brain mask, 1 mm isotropic.

Evaluation labels (``EVAL_LABELS``, 31 FreeSurfer structures present in both data sets): cerebral
WM and cortex, lateral and inferior lateral ventricles, cerebellum WM and cortex, thalamus, caudate,
putamen, pallidum, hippocampus, amygdala, accumbens, ventral DC (left and right: 28) plus the 3rd and
4th ventricles and the brainstem. Left out: CSF (24: the whole subarachnoid CSF in SynthSeg maps but
only a few basal cisterns in FreeSurfer's aseg), vessels (30/62) and the 5th ventricle (72) (tens of
voxels), the optic chiasm (85), choroid plexus (31/63) and WM hypointensities (77) (absent from the
SynthSeg maps). SynthSeg maps are first converted with ``synthseg_segmentation_labels.npy``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from dinoreg.core.volume import Grid, Volume

#: the repository checkout this package sits in (DinoRegistration/dinoreg/data/synthesis.py -> repository)
REPO = Path(__file__).resolve().parents[3]


def find_shared_data() -> Path:
    """Where the training/benchmark data lives: ``$DINOREG_SHARED_DATA``, else ``shared/data`` beside the
    repository checkout (``<repository>/../shared/data``, this project's layout). No search: one documented place."""
    if os.environ.get("DINOREG_SHARED_DATA"):
        return Path(os.environ["DINOREG_SHARED_DATA"]).expanduser()
    return REPO.parent / "shared" / "data"


SHARED_DATA = find_shared_data()
SYNTHSEG_DIR = SHARED_DATA / "synthseg"
VOXELMORPH_SCAN = SHARED_DATA / "brain" / "test_scan.npz"

#: bump when the synthesis changes, so stale cached images are not reused
SYNTH_VERSION = 2
#: output size in LIA voxel order (axis 0 L, 1 I, 2 A), as the voxelmorph scan
CROP_SHAPE: tuple[int, int, int] = (160, 192, 224)
#: LIA voxel axes as columns in LPS: i -> Left (+x), j -> Inferior (-z), k -> Anterior (-y)
LIA_DIRECTION_LPS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]])

MEAN_JITTER = 0.05
WITHIN_CLASS_CV = 0.08
BLUR_SIGMA_MM = 0.8
BIAS_STD = 0.10
BIAS_GRID = 4
NOISE_STD = 2.0

#: tissue class -> mean T1 intensity on a WM = 110 scale (from the OASIS scan's per-label means)
TISSUE_T1_MEAN: dict[str, float] = {
    "background": 0.0, "cerebral_wm": 110.0, "cortex": 70.0, "lateral_ventricle": 26.0,
    "inferior_lateral_ventricle": 48.0, "cerebellum_wm": 92.0, "cerebellum_cortex": 64.0,
    "thalamus": 93.0, "caudate": 81.0, "putamen": 91.0, "pallidum": 102.0, "hippocampus": 73.0,
    "amygdala": 71.0, "accumbens": 79.0, "ventral_dc": 101.0, "vessel": 72.0, "third_ventricle": 39.0,
    "fourth_ventricle": 27.0, "brainstem": 89.0, "csf": 40.0, "fifth_ventricle": 45.0,
    "optic_chiasm": 79.0, "wm_lesion": 83.0, "extracerebral": 0.0,
}

#: every SynthSeg generation label -> tissue class (left and right share the class)
LABEL_TISSUE: dict[int, str] = {
    0: "background", 14: "third_ventricle", 15: "fourth_ventricle", 16: "brainstem", 24: "csf",
    72: "fifth_ventricle", 85: "optic_chiasm",
    **{label: "extracerebral" for label in (502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530)},
    2: "cerebral_wm", 41: "cerebral_wm", 3: "cortex", 42: "cortex", 4: "lateral_ventricle",
    43: "lateral_ventricle", 136: "lateral_ventricle", 163: "lateral_ventricle",
    5: "inferior_lateral_ventricle", 44: "inferior_lateral_ventricle", 137: "inferior_lateral_ventricle",
    164: "inferior_lateral_ventricle", 7: "cerebellum_wm", 46: "cerebellum_wm", 8: "cerebellum_cortex",
    47: "cerebellum_cortex", 10: "thalamus", 49: "thalamus", 11: "caudate", 50: "caudate", 12: "putamen",
    51: "putamen", 13: "pallidum", 52: "pallidum", 17: "hippocampus", 53: "hippocampus", 18: "amygdala",
    54: "amygdala", 25: "wm_lesion", 57: "wm_lesion", 26: "accumbens", 58: "accumbens", 28: "ventral_dc",
    60: "ventral_dc", 30: "vessel", 62: "vessel",
}

NOT_BRAIN = {0, 24, 502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530}

#: the 31 FreeSurfer structures Dice/HD95 are computed on (see the module docstring)
EVAL_LABELS: list[int] = [2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 26, 28,
                          41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60]

STRUCTURE_NAMES: dict[int, str] = {
    2: "cerebral WM", 3: "cerebral cortex", 4: "lateral ventricle", 5: "inf. lateral ventricle",
    7: "cerebellum WM", 8: "cerebellum cortex", 10: "thalamus", 11: "caudate", 12: "putamen",
    13: "pallidum", 14: "3rd ventricle", 15: "4th ventricle", 16: "brainstem", 17: "hippocampus",
    18: "amygdala", 26: "accumbens", 28: "ventral DC",
}
#: right-hemisphere id -> left-hemisphere id (for left/right-merged per-structure tables)
RIGHT_TO_LEFT: dict[int, int] = {41: 2, 42: 3, 43: 4, 44: 5, 46: 7, 47: 8, 49: 10, 50: 11, 51: 12,
                                 52: 13, 53: 17, 54: 18, 58: 26, 60: 28}


@dataclass
class Subject:
    """Paths of one cached subject: a T1-like image and its evaluation label map (NIfTI, LPS)."""

    name: str
    image: Path
    labels: Path


def lia_volume(array_lia: np.ndarray) -> Volume:
    """Wrap an LIA-ordered array (axis 0 L, 1 I, 2 A; 1 mm) as a volume centred on the origin."""
    size = np.asarray(array_lia.shape, dtype=np.float64)
    origin = -LIA_DIRECTION_LPS @ ((size - 1.0) / 2.0)
    grid = Grid(tuple(array_lia.shape), origin, np.ones(3), LIA_DIRECTION_LPS)
    return Volume(np.ascontiguousarray(array_lia.transpose(2, 1, 0)), grid)


def load_lia_labels(path: Path) -> np.ndarray:
    """A label map as an int16 array in LIA voxel order (reoriented from its header if needed)."""
    import nibabel as nib  # lazy: only for NIfTI/MGZ header checks

    image = nib.load(str(path))
    current = nib.orientations.io_orientation(image.affine)
    target = nib.orientations.axcodes2ornt(("L", "I", "A"))
    transform = nib.orientations.ornt_transform(current, target)
    array = np.asarray(image.dataobj).astype(np.int16)
    return nib.orientations.apply_orientation(array, transform).astype(np.int16)


def crop_or_pad(array: np.ndarray, centre: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The box of ``shape`` centred on ``centre`` (voxel index), zero outside ``array``."""
    out = np.zeros(shape, dtype=array.dtype)
    start = np.round(np.asarray(centre) - (np.asarray(shape) - 1) / 2.0).astype(int)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.asarray(shape), array.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


def brain_mask(labels: np.ndarray) -> np.ndarray:
    """Skull-stripping mask: brain labels closed and filled, plus the CSF touching them."""
    tissue = ~np.isin(labels, list(NOT_BRAIN))
    mask = ndimage.binary_closing(tissue, iterations=2, border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    near = ndimage.binary_dilation(mask, iterations=1)
    return mask | (near & (labels == 24))


def bias_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field exp(b), b a BIAS_GRID^3 Gaussian grid upsampled cubically."""
    coarse = rng.normal(0.0, BIAS_STD, size=(BIAS_GRID,) * 3)
    zoom = [s / BIAS_GRID for s in shape]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest")
    return np.exp(field[: shape[0], : shape[1], : shape[2]]).astype(np.float32)


def synthesize_t1(labels: np.ndarray, seed: int) -> np.ndarray:
    """T1-like float32 image in [0, 1] from a generation label map (any voxel order, 1 mm)."""
    rng = np.random.default_rng(seed)
    mask = brain_mask(labels)
    tissue_means = {name: mean * (1.0 + rng.normal(0.0, MEAN_JITTER)) for name, mean in TISSUE_T1_MEAN.items()}
    image = np.zeros(labels.shape, dtype=np.float32)
    for label in np.unique(labels):
        if int(label) in NOT_BRAIN and int(label) != 24:
            continue
        tissue = LABEL_TISSUE.get(int(label), "cerebral_wm")
        mean = tissue_means[tissue]
        where = labels == label
        image[where] = rng.normal(mean, WITHIN_CLASS_CV * mean, int(where.sum()))
    image[~mask] = 0.0
    image = ndimage.gaussian_filter(image, BLUR_SIGMA_MM)
    image *= bias_field(image.shape, rng)
    image += rng.normal(0.0, NOISE_STD, image.shape).astype(np.float32)
    image[~mask] = 0.0
    scale = np.percentile(image[mask], 99.9)
    return np.clip(image / scale, 0.0, 1.0).astype(np.float32)


def evaluation_labels(generation_labels: np.ndarray) -> np.ndarray:
    """SynthSeg generation ids -> FreeSurfer segmentation ids (its own mapping), then only EVAL_LABELS kept."""
    source = np.load(SYNTHSEG_DIR / "generation_labels.npy").astype(int)
    target = np.load(SYNTHSEG_DIR / "synthseg_segmentation_labels.npy").astype(int)
    lut = np.zeros(int(max(source.max(), generation_labels.max())) + 1, dtype=np.int16)
    lut[source] = target
    converted = lut[generation_labels]
    converted[~np.isin(converted, EVAL_LABELS)] = 0
    return converted


def write_nifti(volume: Volume, path: Path) -> None:
    sitk.WriteImage(volume.to_sitk(), str(path))


def read_cached_volume(path: Path) -> Volume:
    """A cached NIfTI as a Volume (LPS geometry from the header)."""
    return Volume.from_sitk(sitk.ReadImage(str(path)))


def crop_tag(shape: tuple[int, int, int]) -> str:
    return "x".join(str(s) for s in shape)


def synthseg_subject(number: int, cache: Path, shape: tuple[int, int, int] = CROP_SHAPE) -> Subject:
    """Synthesise (or reuse from ``cache``) SynthSeg subject ``number`` (1..20), cropped to ``shape``."""
    name = f"synthseg{number:02d}"
    stem = cache / f"{name}_{crop_tag(shape)}_v{SYNTH_VERSION}"
    subject = Subject(name, Path(f"{stem}_t1.nii"), Path(f"{stem}_labels.nii"))
    if subject.image.exists() and subject.labels.exists():
        return subject
    cache.mkdir(parents=True, exist_ok=True)
    labels = load_lia_labels(SYNTHSEG_DIR / f"training_seg_{number:02d}.nii.gz")
    box = np.argwhere(~np.isin(labels, list(NOT_BRAIN)))
    centre = (box.min(0) + box.max(0)) / 2.0
    labels = crop_or_pad(labels, centre, shape)
    image = synthesize_t1(labels, seed=1000 + number)
    write_nifti(lia_volume(image), subject.image)
    write_nifti(lia_volume(evaluation_labels(labels).astype(np.int16)), subject.labels)
    return subject


def voxelmorph_subject(cache: Path, shape: tuple[int, int, int] = CROP_SHAPE) -> Subject:
    """The voxelmorph OASIS scan (LIA, 1 mm) with its labels restricted to EVAL_LABELS, cropped to ``shape``."""
    name = "oasis-vxm"
    stem = cache / f"{name}_{crop_tag(shape)}_v{SYNTH_VERSION}"
    subject = Subject(name, Path(f"{stem}_t1.nii"), Path(f"{stem}_labels.nii"))
    if subject.image.exists() and subject.labels.exists():
        return subject
    cache.mkdir(parents=True, exist_ok=True)
    data = np.load(VOXELMORPH_SCAN)
    image = data["vol"].astype(np.float32)
    labels = np.round(data["seg"]).astype(np.int16)
    labels[~np.isin(labels, EVAL_LABELS)] = 0
    if tuple(image.shape) != tuple(shape):
        box = np.argwhere(labels > 0)
        centre = (box.min(0) + box.max(0)) / 2.0
        image, labels = crop_or_pad(image, centre, shape), crop_or_pad(labels, centre, shape)
    write_nifti(lia_volume(image), subject.image)
    write_nifti(lia_volume(labels), subject.labels)
    return subject


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Synthesise T1-like SynthSeg subjects into a cache folder (and a PNG preview).")
    parser.add_argument("subjects", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("DINOREG_BENCH_CACHE", "/tmp/dinoreg-benchmark")))
    parser.add_argument("--preview", type=Path, default=None, help="write a PNG with mid slices of each subject and the OASIS scan")
    args = parser.parse_args()
    made = [synthseg_subject(n, args.cache) for n in args.subjects] + [voxelmorph_subject(args.cache)]
    for subject in made:
        print(subject.name, subject.image, subject.labels)
    if args.preview:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(len(made), 3, figsize=(9, 3 * len(made)))
        for row, subject in zip(np.atleast_2d(axes), made):
            lia = read_cached_volume(subject.image).array.transpose(2, 1, 0)
            mid = [s // 2 for s in lia.shape]
            views = (lia[mid[0]], lia[:, mid[1]].T, lia[:, :, mid[2]].T)  # sagittal, axial, coronal
            for axis, image in zip(row, views):
                axis.imshow(image, cmap="gray", vmin=0, vmax=1)
                axis.set_title(subject.name, fontsize=8)
                axis.axis("off")
        figure.tight_layout()
        figure.savefig(args.preview, dpi=80)
