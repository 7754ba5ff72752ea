"""DINO path details of issue 7 (bugs 8-11): outside the field of view, the CT window parameter,
one normalisation rule with one mask, and the placement of token grids (no transposition, no
half-token shift) checked with a fake backbone whose tokens are pooled pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoreg.errors import InputError
from dinoreg.features.dino import backbones
from dinoreg.features.dino import slicewise
from dinoreg.methods import zeroshot
from dinoreg.methods.base import Availability, RegistrationProblem, prepare_working_pair
from dinoreg.progress import Progress
from dinoreg.core.transforms import AffineMap, Transform
from dinoreg.core.volume import Grid, Volume


@dataclass
class _Output:
    last_hidden_state: torch.Tensor


class PoolingViT(torch.nn.Module):
    """Tokens = patch means of the grey image and of a few fixed nonlinear maps of it (one prefix token)."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.weight = torch.nn.Parameter(torch.ones(1))  # Backbone.device reads a parameter

    def forward(self, pixel_values: torch.Tensor) -> _Output:
        grey = pixel_values.mean(dim=1, keepdim=True)
        maps = torch.cat([grey, grey.square(), torch.sin(3 * grey), torch.cos(2 * grey)], dim=1)
        tokens = F.avg_pool2d(maps, self.patch).flatten(2).transpose(1, 2)  # (B, h*w, 4), row-major (h, w)
        return _Output(torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1))


@pytest.fixture
def pooling_backbone(monkeypatch):
    backbone = backbones.Backbone(PoolingViT(4), "dinov2", 4, 4, 1, "test")
    monkeypatch.setattr(slicewise, "load_backbone", lambda spec, device: backbone)
    monkeypatch.setattr(zeroshot, "dino_module_availability", lambda model: Availability(True))
    return backbone


# ------------------------------------------------------------------------------ bug 11: placement

def blob(shape, centre, sigma) -> torch.Tensor:
    k, j, i = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    distance = sum((axis - c) ** 2 / (2 * s ** 2) for axis, c, s in zip((k, j, i), centre, sigma))
    return (1000 * torch.exp(-distance))[None, None]


def centroid(features: torch.Tensor) -> np.ndarray:
    """Centroid (k, j, i) of the first PCA channel's deviation from the far corner value."""
    channel = features[0, 0]
    weight = (channel - channel[0, 0, 0]).abs()
    weight = torch.where(weight > 0.05 * weight.max(), weight, torch.zeros_like(weight))
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in channel.shape), indexing="ij")
    return np.array([float((g * weight).sum() / weight.sum()) for g in grids])


@pytest.mark.parametrize("axes", ["axial", "coronal", "sagittal"])
def test_token_grids_are_placed_without_transposition_or_half_token_shift(pooling_backbone, axes):
    """Issue 7 bug 11: an off-centre blob in an asymmetric volume (h != w token grids on every
    axis, a foreground crop that does not start at 0): the features' centroid is the blob's."""
    shape, centre = (40, 52, 64), (22.0, 20.0, 38.0)
    volume = blob(shape, centre, (4.0, 5.0, 6.0))
    grid = Grid(shape[::-1], spacing=(1.0, 1.0, 1.0))
    params = {"model": "fake", "slice_axes": axes, "token_mm": 4.0, "slice_stride": 1, "pca_channels": 2}
    fixed, _ = slicewise.dino_feature_pair(volume, volume.clone(), grid, None, None, params, "cpu", Progress())
    plans = [slicewise.plan_axis(a, shape, (1.0, 1.0, 1.0), 4.0, 4) for a in slicewise.slicing_axes(grid, axes)]
    assert all(plan.tokens[0] != plan.tokens[1] for plan in plans)
    found = centroid(fixed)
    print(axes, found - np.array(centre))
    assert np.abs(found - np.array(centre)).max() < 0.1, (found, centre)


def test_a_whole_token_shift_is_recovered_on_the_right_axis_with_the_right_sign(pooling_backbone):
    """moving = fixed shifted by whole tokens along j, then along i: dino-zeroshot finds each shift."""
    shape = (24, 48, 56)
    generator = torch.Generator().manual_seed(3)
    fixed = torch.zeros(1, 1, *shape)
    for _ in range(25):
        centre = [float(torch.rand(1, generator=generator)) * (n - 16) + 8 for n in shape]
        fixed += blob(shape, centre, (4.0, 4.0, 4.0)) * (0.5 + float(torch.rand(1, generator=generator)))
    grid = Grid(shape[::-1], spacing=(2.0, 2.0, 2.0))
    fixed_volume = Volume(fixed[0, 0].numpy(), grid)
    token_voxels = 2  # token_mm 4 on a 2 mm grid
    method = zeroshot.DinoZeroShot()
    params = method.parameters("fast", {"model": "fake", "token_mm": 4.0, "slice_stride": 1, "pca_channels": 4,
                                        "slice_axes": "all", "working_spacing_mm": 2.0})
    for axis in (1, 2):  # array axes j, then i
        shift = 2 * token_voxels
        moving = torch.roll(fixed, shifts=shift, dims=axis + 2)  # moving(x + shift) = fixed(x)
        problem = RegistrationProblem(fixed_volume, Volume(moving[0, 0].numpy(), grid), params=params)
        field = method.run(problem, Transform()).dense.resampled_to(grid)
        centre = field.displacement[6:18, 12:36, 14:42]  # LPS mm; identity direction: x = i, y = j
        found = np.median(centre.reshape(-1, 3), axis=0) / 2.0  # voxels (di, dj, dk)
        expected = np.zeros(3)
        expected[2 - axis] = shift
        assert np.abs(found - expected).max() < 1.0, (axis, found, expected)


# ------------------------------------------------------------------------------ bug 8: outside the field of view

def test_moving_outside_its_field_of_view_is_filled_with_its_minimum_not_zero():
    """A CT in HU: 0 is water. Slices the moving CT does not cover must look like air (its minimum)."""
    grid = Grid((20, 20, 30), spacing=(2.0, 2.0, 2.0))
    ct = np.full(grid.shape, -1000.0, np.float32)
    ct[5:25, 5:15, 5:15] = 40.0  # soft tissue body
    fixed = Volume(ct, grid)
    moving = Volume(ct.copy(), grid)
    shifted = Transform([AffineMap(np.eye(3), np.array([0.0, 0.0, 30.0]))])  # half the moving is out of view
    pair = prepare_working_pair(RegistrationProblem(fixed, moving), shifted, 2.0)
    outside = pair.moving[0, 0, -8:]  # fixed slices mapped beyond the moving's last slice
    assert float(outside.max()) == pytest.approx(-1000.0)


# ------------------------------------------------------------------------------ bug 9: the CT window

def test_ct_window_is_a_parameter_with_a_soft_tissue_default_for_body_ct():
    method = zeroshot.DinoZeroShot()
    assert method.parameters(overrides={"ct_window": "-160,240"})["ct_window"] == "-160,240"
    assert slicewise.parse_ct_window(method.parameters("body-ct")["ct_window"]) == (-150.0, 250.0)
    assert slicewise.parse_ct_window(method.parameters()["ct_window"]) == (-1000.0, 1000.0)
    assert slicewise.effective_settings({"ct_window": "-150,250"}, "cpu").ct_window == (-150.0, 250.0)
    for bad in ("abc", "250,-150", "1,2,3"):
        with pytest.raises(InputError, match="ct_window"):
            slicewise.effective_settings({"ct_window": bad}, "cpu")


def test_ct_window_sets_the_grey_levels():
    from dinoreg.features.dino.intensity import normalise_intensity

    hu = torch.tensor([-1000.0] * 50 + [-150.0, 50.0, 250.0] + [1500.0] * 47)
    soft = normalise_intensity(hu, None, (-150.0, 250.0))
    assert soft[50:53].tolist() == pytest.approx([0.0, 0.5, 1.0])


# ------------------------------------------------------------------------------ bug 10: one rule for both

def test_one_mask_does_not_change_the_normalisation_of_one_image_only(pooling_backbone):
    """The same image as fixed (with a mask) and moving (without) must get the same grey values."""
    shape = (16, 20, 24)
    volume = blob(shape, (8.0, 10.0, 12.0), (3.0, 4.0, 5.0)) + 100.0
    mask = torch.zeros_like(volume)
    mask[..., 4:12, 5:15, 6:18] = 1.0
    grid = Grid(shape[::-1])
    settings = slicewise.effective_settings({"model": "fake"}, "cpu")
    volumes, _, _ = slicewise.prepare_pair([(volume, mask), (volume.clone(), None)], grid, settings, torch.device("cpu"))
    torch.testing.assert_close(volumes[0], volumes[1])
    volume_ = Volume(volume[0, 0].numpy(), grid)
    problem = RegistrationProblem(volume_, volume_, volume_.with_array(mask[0, 0].numpy()), None)
    pair = prepare_working_pair(problem, Transform(), 0.0)
    params, masked = zeroshot.MindZeroShot().parameters(), zeroshot.both_masked(problem)
    fixed_side = zeroshot.ImageOnGrid.of(pair.fixed, pair.fixed_mask, pair.grid, params, masked)
    moving_side = zeroshot.ImageOnGrid.of(pair.moving, pair.moving_mask, pair.grid, params, masked)
    torch.testing.assert_close(fixed_side.normalised, moving_side.normalised)


# ------------------------------------------------------------------------------ bug 6: load errors say what failed

@pytest.mark.parametrize("error,expected,not_expected", [
    (ImportError("cannot import name 'Dinov3ViTModel' from 'transformers'"), "transformers>=5", "corrupted"),
    (ValueError("The checkpoint you are trying to load has model type `dinov3_vit` but Transformers does not "
                "recognize this architecture"), "does not know this model type", "corrupted"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: out of memory"),
     "not enough memory", "corrupted"),
    (PermissionError(13, "Permission denied"), "permission denied", "corrupted"),
    (RuntimeError("Error while deserializing header: MetadataIncompleteBuffer"), "truncated or corrupted", "transformers>=5 ("),
])
def test_a_backbone_that_fails_to_load_says_what_really_failed(monkeypatch, tmp_path, error, expected, not_expected):
    """Issue 7 bug 6: every load failure was reported as a corrupted file to delete."""
    folder = tmp_path / "model"
    folder.mkdir()

    def failing(location):
        raise error

    monkeypatch.setattr(backbones, "load_hf_folder", failing)
    source = backbones.ModelSource(str(folder), "hf_folder", str(folder), None)
    monkeypatch.setattr(backbones, "resolve_model", lambda spec: source)
    backbones.forget_loaded_backbones()
    with pytest.raises(InputError) as raised:
        backbones.load_backbone(str(folder))
    message = str(raised.value)
    assert expected in message and not_expected not in message and "\n" not in message, message
