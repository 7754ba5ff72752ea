"""Training data: random-shape pairs, random deformations, brain synthesis, folder/CSV datasets."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dinoreg.data import deformations
from dinoreg.data import random_shapes
from dinoreg.errors import InputError


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_affine_displacement_matches_hand_computed_map():
    # x -> A x + b with A = diag(2, 1, 1), b = (1, 0, -1): at voxel (3, 4, 5) the map is (7, 4, 4)
    matrix = torch.tensor([[2.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, -1]])
    field = deformations.affine_displacement(matrix, (8, 8, 8))
    assert field[0, :, 3, 4, 5].tolist() == [4.0, 0.0, -1.0]
    identity = deformations.random_affine_matrix(generator(), 0.0, 0.0, 0.0, (8, 8, 8))
    assert torch.allclose(deformations.affine_displacement(identity, (8, 8, 8)), torch.zeros(1, 3, 8, 8, 8), atol=1e-5)


def test_random_velocity_is_smooth_and_bounded():
    velocity = deformations.random_velocity((32, 32, 32), 3.0, generator(1))
    assert velocity.shape == (1, 3, 32, 32, 32)
    assert 0 < velocity.abs().max() <= 3.0 + 1e-5
    # smooth: neighbouring voxels differ by a small fraction of the amplitude
    assert (velocity[:, :, 1:] - velocity[:, :, :-1]).abs().max() < 0.5 * velocity.abs().max()


def test_random_shape_pair_is_deterministic_and_deformed():
    settings = random_shapes.RandomShapeSettings(max_velocity_voxels=4.0)
    first = random_shapes.random_shape_pair((32, 32, 32), generator(3), settings)
    again = random_shapes.random_shape_pair((32, 32, 32), generator(3), settings)
    assert torch.equal(first.fixed, again.fixed) and torch.equal(first.moving_labels, again.moving_labels)
    assert first.fixed.shape == (1, 1, 32, 32, 32) and first.fixed_labels.dtype == torch.int64
    assert float(first.fixed.min()) == 0.0 and float(first.fixed.max()) == 1.0
    labels = torch.unique(first.fixed_labels)
    assert 4 <= len(labels) <= settings.n_shapes
    agreement = (first.fixed_labels == first.moving_labels).float().mean()
    assert 0.3 < agreement < 0.999  # two different deformations of one label map


def test_synthesis_generator_is_shared_and_deterministic():
    from dinoreg.data import synthesis

    labels = np.zeros((24, 24, 24), dtype=np.int16)
    labels[4:20, 4:20, 4:20] = 2  # cerebral WM
    labels[8:16, 8:16, 8:16] = 4  # lateral ventricle
    image = synthesis.synthesize_t1(labels, seed=5)
    assert np.array_equal(image, synthesis.synthesize_t1(labels, seed=5))
    assert image[0, 0, 0] == 0.0 and image.max() <= 1.0
    assert image[12, 12, 12] < image[6, 6, 6]  # ventricle darker than WM in T1


def test_brain_pairs_from_a_label_map(tmp_path):
    from dinoreg.data import brain_pairs
    from dinoreg.data import synthesis

    if not (synthesis.SYNTHSEG_DIR / "training_seg_01.nii.gz").exists():
        pytest.skip("SynthSeg label maps not available")
    sampler = brain_pairs.BrainPairSampler([1], 4, tmp_path)
    pair = sampler.sample(generator(0))
    assert sampler.shape == (40, 48, 56) and pair.fixed.shape == (1, 1, 40, 48, 56)
    assert set(torch.unique(pair.fixed_labels).tolist()) <= set([0] + brain_pairs.DICE_LABELS)
    assert float(pair.fixed[pair.fixed_labels > 0].mean()) > 0.2  # brain is bright, background 0
    assert float(pair.fixed[0, 0, 0, 0, 0]) == 0.0
    again = sampler.sample(generator(0))
    assert torch.equal(pair.moving, again.moving)


def test_brain_pairs_synthesised_finer_then_pooled_like_real_images(tmp_path):
    """synthesis_factor 2 at 4 mm: anatomy made at 2 mm, images average-pooled (partial-volume
    values between the tissue means), labels the cells' centre voxels, fields in coarse voxels."""
    from dinoreg.data import brain_pairs
    from dinoreg.data import synthesis

    if not (synthesis.SYNTHSEG_DIR / "training_seg_01.nii.gz").exists():
        pytest.skip("SynthSeg label maps not available")
    sampler = brain_pairs.BrainPairSampler([1], 4, tmp_path, synthesis_factor=2)
    assert sampler.fine_shape == (80, 96, 112) and sampler.shape == (40, 48, 56)
    pair = sampler.sample(generator(1))
    assert pair.fixed.shape == pair.fixed_labels.shape == (1, 1, 40, 48, 56)
    assert float(pair.fixed[pair.fixed_labels > 0].mean()) > 0.2 and float(pair.fixed.max()) <= 1.0
    # pooling by hand: partial-volume cells on the boundary of two tissues; a constant fine
    # displacement of 2 fine voxels is 1 coarse voxel; labels are taken at the cells' centre voxels
    image = torch.full((1, 1, 80, 96, 112), 0.2)  # background 0 (first slices), tissue 0.2 and 1.0
    image[..., :10, :, :] = 0.0
    image[..., :, :, 57:] = 1.0  # the coarse cell of fine columns 56, 57 is (0.2 + 1) / 2 = 0.6 -> 0.5 normalised
    labels = torch.arange(80 * 96 * 112).view(1, 1, 80, 96, 112)
    pooled, pooled_labels, field = sampler.pool(image, labels, torch.full((1, 3, 80, 96, 112), 2.0))
    assert torch.allclose(pooled[0, 0, 5, 5, 28], torch.tensor(0.5)) and torch.allclose(field, torch.ones(1))
    assert int(pooled_labels[0, 0, 3, 4, 5]) == int(labels[0, 0, 7, 9, 11])
    with pytest.raises(ValueError):
        brain_pairs.BrainPairSampler([1], 4, tmp_path, synthesis_factor=3)


def write_volume(path, array, spacing=(2.0, 2.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_folder_and_csv_datasets(tmp_path):
    from dinoreg.data.volumes import VolumePairSampler, csv_entries, folder_entries

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i in range(3):
        array = rng.random((10, 12, 14)).astype(np.float32)
        write_volume(tmp_path / "images" / f"s{i}.nii.gz", array)
        write_volume(tmp_path / "labels" / f"s{i}.nii.gz", (array > 0.5).astype(np.int16))
    entries = folder_entries(tmp_path / "images", tmp_path / "labels")
    assert len(entries) == 3 and all(e.labels is not None for e in entries)
    sampler = VolumePairSampler(entries, spacing_mm=2.0, multiple=8)
    assert sampler.shape == (16, 16, 16) and sampler.label_ids == [1]
    pair = sampler.sample(generator(0))
    assert not torch.equal(pair.fixed, pair.moving) and pair.fixed_labels.shape == (1, 1, 16, 16, 16)
    (tmp_path / "list.csv").write_text("image,labels\nimages/s0.nii.gz,labels/s0.nii.gz\nimages/s1.nii.gz,\n")
    assert [e.labels is None for e in csv_entries(tmp_path / "list.csv")] == [False, True]
    (tmp_path / "bad.csv").write_text("image\nimages/missing.nii.gz\n")
    with pytest.raises(InputError, match="missing image"):
        csv_entries(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="at least 2"):
        folder_entries(tmp_path / "labels" / "..", "")  # holds no images directly


def test_feature_cache_computes_each_volume_once(tmp_path):
    from dinoreg.data.feature_cache import FeatureCache

    calls = []

    def extractor(image):
        calls.append(1)
        return image * 2.0

    cache = FeatureCache(tmp_path, {"kind": "double", "version": 1})
    image = torch.rand(1, 1, 4, 4, 4)
    first = cache.get(image, extractor)
    second = cache.get(image.clone(), extractor)
    assert torch.equal(first, second) and len(calls) == 1 and cache.hits == 1
    other = FeatureCache(tmp_path, {"kind": "double", "version": 2})  # another extractor: recomputed
    other.get(image, extractor)
    assert len(calls) == 2


def test_same_subject_pairs_carry_their_true_displacement(tmp_path):
    from dinoreg.data import brain_pairs
    from dinoreg.data import synthesis
    from dinoreg.core.geometry import warp
    from dinoreg.training.validation import mean_dice

    if not (synthesis.SYNTHSEG_DIR / "training_seg_01.nii.gz").exists():
        pytest.skip("SynthSeg label maps not available")
    settings = brain_pairs.BrainSynthSettings(same_subject=1.0, max_velocity_mm=12.0)
    sampler = brain_pairs.BrainPairSampler([1], 4, tmp_path, settings)
    pair = sampler.sample(generator(4))
    assert pair.displacement is not None and pair.displacement.shape == (1, 3, 40, 48, 56)
    before = mean_dice(pair.fixed_labels, pair.moving_labels, brain_pairs.DICE_LABELS)
    after = mean_dice(pair.fixed_labels, warp(pair.moving_labels, pair.displacement, mode="nearest"), brain_pairs.DICE_LABELS)
    assert after > before + 0.1, (before, after)  # limited by nearest-neighbour resampling at 4 mm, not 1.0
