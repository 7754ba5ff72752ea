"""MIND-SSC features, the ConvexAdam optimiser and the zero-shot methods.

The end-to-end test deforms the shared brain scan (voxelmorph's test_scan.npz, 1 mm, downsampled to
2 mm by conftest's ``brain_scan_2mm`` to keep the suite fast) with a known smooth field and checks that
``mind-zeroshot`` recovers it (endpoint error, Dice of warped labels).
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoreg.core import geometry
from dinoreg.core import spatial
from dinoreg.errors import Cancelled, InputError
from dinoreg.core.intensity import robust_normalise
from dinoreg.features.mind import MIND_CHANNELS, mind_ssc
from dinoreg.core.spatial import voxels_per_axis
from dinoreg.methods import zeroshot
from dinoreg.methods.base import RegistrationProblem
from dinoreg.optim.convex_adam import (STAGE_ADAM, STAGE_SEARCH, ConvexAdamSettings, convex_adam, convex_search, make_inverse_consistent, search_cost_volume, search_geometry)
from dinoreg.progress import Progress
from dinoreg.core.transforms import Transform, warp_volume
from dinoreg.core.volume import Volume


def blobs(shape=(32, 32, 32), seed=0, count=12) -> torch.Tensor:
    """A smooth random volume (sum of Gaussian blobs), ``(1, 1, K, J, I)``."""
    generator = torch.Generator().manual_seed(seed)
    k, j, i = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    volume = torch.zeros(shape)
    for _ in range(count):
        centre = [float(torch.rand(1, generator=generator)) * (n - 12) + 6 for n in shape]
        sigma = 2.0 + 3.0 * float(torch.rand(1, generator=generator))
        amplitude = 0.5 + float(torch.rand(1, generator=generator))
        volume += amplitude * torch.exp(-((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) / (2 * sigma ** 2))
    return volume[None, None]


def smooth_random_field(shape, amplitude_voxels: float, seed: int, control=(4, 5, 5)) -> torch.Tensor:
    """A smooth random voxel displacement (1, 3, K, J, I): coarse noise, upsampled and box-smoothed,
    scaled to a mean length of ``amplitude_voxels``."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3, *control), generator=generator)
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    for _ in range(3):
        field = F.avg_pool3d(field, 5, stride=1, padding=2, count_include_pad=False)
    return field * (amplitude_voxels / field.norm(dim=1).mean())


# ------------------------------------------------------------------------------------------ MIND

def test_mind_shape_range_and_dtype():
    image = blobs()
    features = mind_ssc(image)
    assert features.shape == (1, MIND_CHANNELS, 32, 32, 32)
    assert features.dtype == torch.float32
    assert float(features.min()) > 0.0 and float(features.max()) <= 1.0 + 1e-6
    # the channels differ (they are not twelve copies of one map)
    assert float(features.std(dim=1).mean()) > 1e-3


def test_mind_invariant_to_intensity_scaling_and_offset():
    image = blobs(seed=1)
    reference = mind_ssc(image)
    assert torch.allclose(mind_ssc(image * 37.5 + 100.0), reference, atol=1e-4)
    assert torch.allclose(mind_ssc(image * 0.01), reference, atol=1e-4)


def test_mind_with_mask_ignores_everything_outside_the_mask():
    image = blobs(seed=2)
    mask = torch.zeros_like(image)
    mask[..., 6:26, 8:24, 4:28] = 1
    noisy = image + (1 - mask) * torch.rand(image.shape, generator=torch.Generator().manual_seed(0)) * 5
    a, b = mind_ssc(image, mask), mind_ssc(noisy, mask)
    assert a.shape == (1, MIND_CHANNELS, 32, 32, 32)
    assert torch.allclose(a, b, atol=1e-6)
    # without the mask the outside noise does change the features
    assert not torch.allclose(mind_ssc(image), mind_ssc(noisy), atol=1e-3)


def test_mind_anisotropic_grid_scales_offsets_per_axis():
    # spacing (si, sj, sk) = (1, 1, 4) mm: 2 voxels in-plane is 2 mm; along k one voxel (4 mm) is the nearest
    assert voxels_per_axis(2, (1.0, 1.0, 4.0), minimum=1) == (1, 2, 2)
    assert voxels_per_axis(1, (1.0, 1.0, 4.0), minimum=0) == (0, 1, 1)
    image = blobs(shape=(8, 32, 32), seed=3)
    assert mind_ssc(image, spacing=(1.0, 1.0, 4.0)).shape == (1, MIND_CHANNELS, 8, 32, 32)


def test_mind_rejects_bad_input():
    with pytest.raises(InputError):
        mind_ssc(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(InputError):
        mind_ssc(torch.zeros(1, 1, 8, 8, 8), dilation=0)


def test_robust_normalise_to_unit_range():
    image = blobs(seed=4) * 1000 + 50
    image[..., 0, 0, 0] = 1e6  # an outlier must not squash the range
    normalised = robust_normalise(image)
    assert float(normalised.min()) == 0.0 and float(normalised.max()) == 1.0
    assert float(normalised.median()) > 0.01


# ------------------------------------------------------------------------------ convex search

def shifted_pair(shift_kji=(2.0, -2.0, 4.0), seed=5):
    """Fixed blobs and a moving copy with ``moving(x + t) = fixed(x)``: the true field is t (voxels, (dk, dj, di))."""
    fixed = blobs(shape=(40, 40, 40), seed=seed, count=30)
    t = torch.tensor(shift_kji).view(1, 3, 1, 1, 1).expand(1, 3, 40, 40, 40)
    moving = geometry.warp(fixed, -t)
    return fixed, moving, t


def test_convex_search_recovers_a_translation():
    fixed, moving, truth = shifted_pair()
    settings = ConvexAdamSettings(grid_spacing=4, search_step=2, search_radius=3)
    field = convex_search(mind_ssc(fixed), mind_ssc(moving), settings)
    assert field.shape == (1, 3, 40, 40, 40)
    centre = (slice(None), slice(None), slice(12, 28), slice(12, 28), slice(12, 28))
    error = (field - truth)[centre].norm(dim=1)
    assert float(error.median()) < 0.5, float(error.median())


def two_motion_pair(shape=(32, 32, 48)):
    """Fixed blobs; moving = fixed shifted by +2 voxels along i in the left half (i < 20) and by -4
    in the right half (i >= 28). Returns fixed, moving and a mask of the left part ``(1, 1, K, J, I)``."""
    fixed = blobs(shape=shape, seed=11, count=60)
    i = torch.arange(shape[2], dtype=torch.float32)
    shift = torch.where(i < 24, torch.tensor(2.0), torch.tensor(-4.0)).view(1, 1, 1, -1).expand(1, *shape)
    field = torch.stack([torch.zeros(shape), torch.zeros(shape), shift[0]]).unsqueeze(0)  # (dk, dj, di)
    moving = geometry.warp(fixed, -field)
    mask = torch.zeros(1, 1, *shape)
    mask[..., :20] = 1.0
    return fixed, moving, mask


def test_convex_search_follows_the_mask():
    """Issue 7 bug 7: the search ignored the masks; the content outside the mask must not drive the
    field there (the other half moves the other way), the content inside it still does."""
    fixed, moving, mask = two_motion_pair()
    settings = ConvexAdamSettings(grid_spacing=4, search_step=2, search_radius=3)
    f, m = mind_ssc(fixed), mind_ssc(moving)
    unmasked = convex_search(f, m, settings)
    masked = convex_search(f, m, settings, mask=mask, moving_mask=mask)
    left, right = (..., slice(8, 24), slice(8, 24), slice(4, 16)), (..., slice(8, 24), slice(8, 24), slice(34, 44))
    assert float(unmasked[:, 2][left].median()) == pytest.approx(2.0, abs=0.5)  # channel 2: di
    assert float(unmasked[:, 2][right].median()) < -3.0  # without a mask, the right half's motion is found
    assert float(masked[:, 2][left].median()) == pytest.approx(2.0, abs=0.5)
    assert float(masked[:, 2][right].median()) > -1.0, float(masked[:, 2][right].median())


def test_mind_zeroshot_passes_the_masks_to_the_search():
    fixed, moving, mask = two_motion_pair()
    volume = Volume.from_array_ras(fixed[0, 0].numpy())
    params = zeroshot.MindZeroShot().parameters(overrides={"adam_iterations": 0, "working_spacing_mm": 0,
                                                            "foreground_margin_mm": 0, "search_radius": 3})
    mask_volume = volume.with_array(mask[0, 0].numpy().astype(np.uint8))
    problem = RegistrationProblem(volume, volume.with_array(moving[0, 0].numpy()), mask_volume, mask_volume, params=params)
    result = zeroshot.MindZeroShot().run(problem, Transform())
    displacement_mm = result.dense.resampled_to(volume.grid).displacement  # LPS: i is -x for from_array_ras
    right = displacement_mm[8:24, 8:24, 34:44, 0]
    left = displacement_mm[8:24, 8:24, 4:16, 0]
    assert float(np.median(-left)) == pytest.approx(2.0, abs=0.5)
    assert float(np.median(-right)) > -1.0, float(np.median(-right))


def test_flat_cost_ties_choose_zero_displacement():
    """Issue 7 bug 1: in flat background every candidate costs the same; zero must win, not the
    first candidate (the far corner of the search window)."""
    flat = torch.zeros(1, 12, 24, 24, 24)
    settings = ConvexAdamSettings(grid_spacing=4, search_step=2, search_radius=3, inverse_consistent=False)
    field = convex_search(flat, flat, settings)
    assert float(field.abs().max()) == 0.0


def test_cost_volume_does_not_depend_on_chunk_size():
    fixed, moving, _ = shifted_pair()
    f, m = mind_ssc(fixed), mind_ssc(moving)
    search = search_geometry(f.shape[2:], ConvexAdamSettings(grid_spacing=4, search_step=2, search_radius=2), None)
    chunked = search_cost_volume(f, m, search, chunk_size=7)
    whole = search_cost_volume(f, m, search, chunk_size=10_000)
    assert chunked.shape == (125, 10, 10, 10)
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_inverse_consistency_makes_forward_and_backward_compose_to_identity():
    shape = (24, 24, 24)
    forward = smooth_random_field(shape, 1.5, seed=1)
    backward = smooth_random_field(shape, 1.5, seed=2)  # unrelated: far from the inverse

    def residual(f, b):
        return float(geometry.compose(f, b).norm(dim=1).mean())

    before = residual(forward, backward)
    f, b = make_inverse_consistent(forward, backward, iterations=15)
    assert residual(f, b) < 0.1 * before
    assert residual(b, f) < 0.1 * before


def test_settings_validation_names_the_fix():
    with pytest.raises(InputError, match="multiple of search_step"):
        ConvexAdamSettings(grid_spacing=5, search_step=2).validate()
    with pytest.raises(InputError, match="adam_level"):
        ConvexAdamSettings.from_params({"adam_level": 0})
    with pytest.raises(InputError, match="smaller than one search block"):
        convex_search(torch.zeros(1, 1, 2, 8, 8), torch.zeros(1, 1, 2, 8, 8), ConvexAdamSettings())


def test_convex_adam_full_pipeline_small_and_diffeomorphic():
    fixed, moving, truth = shifted_pair(seed=6)
    f, m = mind_ssc(fixed), mind_ssc(moving)
    settings = ConvexAdamSettings(grid_spacing=4, search_step=2, search_radius=3, adam_iterations=15,
                                  adam_level=1, diffeomorphic=True)
    events = []
    progress = Progress(callback=lambda stage, fraction, left: events.append((stage, fraction)))
    progress.plan({STAGE_SEARCH: 1.0, STAGE_ADAM: 1.0})
    field = convex_adam(f, m, settings, progress=progress)
    centre = (slice(None), slice(None), slice(12, 28), slice(12, 28), slice(12, 28))
    assert float((field - truth)[centre].norm(dim=1).median()) < 0.5
    stages = [stage for stage, _ in events]
    assert STAGE_SEARCH in stages and STAGE_ADAM in stages
    assert max(fraction for _, fraction in events) == pytest.approx(1.0)


def test_convex_adam_on_an_anisotropic_grid():
    """3 mm slices, 1 mm in-plane: offsets and steps adapt per axis; a translation is still recovered."""
    shape = (16, 40, 40)
    fixed = blobs(shape=shape, seed=8, count=30)
    truth = torch.tensor([1.0, -2.0, 4.0]).view(1, 3, 1, 1, 1).expand(1, 3, *shape)  # (dk, dj, di) voxels
    moving = geometry.warp(fixed, -truth)
    spacing = (1.0, 1.0, 3.0)  # (si, sj, sk) mm
    f, m = mind_ssc(fixed, spacing=spacing), mind_ssc(moving, spacing=spacing)
    settings = ConvexAdamSettings(grid_spacing=4, search_step=2, search_radius=3, adam_iterations=20)
    search = search_geometry(shape, settings, spacing)
    assert search.step == (1, 2, 2) and search.grid_spacing == (2, 4, 4)
    field = convex_adam(f, m, settings, spacing=spacing)
    centre = (slice(None), slice(None), slice(5, 11), slice(12, 28), slice(12, 28))
    assert float((field - truth)[centre].norm(dim=1).median()) < 0.5


def test_cancel_stops_the_optimiser_and_the_method():
    fixed, moving, _ = shifted_pair()
    progress = Progress()
    progress.cancel()
    with pytest.raises(Cancelled):
        convex_adam(mind_ssc(fixed), mind_ssc(moving), ConvexAdamSettings(search_radius=2), progress=progress)

    # cancelling from another thread while the method runs
    volume = Volume.from_array_ras(fixed[0, 0].numpy(), (2.0, 2.0, 2.0))
    event = threading.Event()
    calls = []

    def callback(stage, fraction, left):
        calls.append(stage)
        if stage == STAGE_SEARCH:
            event.set()

    problem = RegistrationProblem(volume, volume.with_array(moving[0, 0].numpy()), progress=Progress(callback, event))
    with pytest.raises(Cancelled):
        zeroshot.MindZeroShot().run(problem, Transform())
    assert STAGE_ADAM not in calls


# ----------------------------------------------------------------------------------- methods

def test_presets_hold_every_parameter_and_bad_values_are_input_errors():
    for method in (zeroshot.MindZeroShot(), zeroshot.DinoZeroShot(), zeroshot.DinoMind()):
        defaults = method.presets[method.default_preset]
        assert {"brain-mr", "body-ct", "fast"} <= set(method.presets)
        for name, preset in method.presets.items():
            assert set(preset) <= set(defaults), (method.name, name)
            method.parameters(name)  # every preset resolves
        assert set(method.stage_weights) >= {STAGE_SEARCH, STAGE_ADAM}
    dino_defaults = zeroshot.DinoMind().parameters()
    for key in ("model", "slice_axes", "token_mm", "slice_stride", "pca_channels", "batch_size", "precision", "mind_radius"):
        assert key in dino_defaults
    with pytest.raises(InputError):
        zeroshot.MindZeroShot().parameters(overrides={"no_such_parameter": 1})
    assert zeroshot.MindZeroShot().parameters(overrides={"adam_iterations": "7"})["adam_iterations"] == 7
    volume = Volume.from_array_ras(blobs()[0, 0].numpy())
    for bad in ({"grid_spacing": 5}, {"working_spacing_mm": -1.0}, {"intensity_low_percent": 99.9},
                {"mind_dilation": 0}):
        with pytest.raises(InputError):
            zeroshot.MindZeroShot().run(RegistrationProblem(volume, volume, params=bad), Transform())


def test_dino_methods_report_unavailable_when_the_backend_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "dinoreg.features.dino", None)  # import now fails
    for method in (zeroshot.DinoZeroShot(), zeroshot.DinoMind()):
        availability = method.availability()
        assert not availability.ok
        assert "DINO" in availability.reason
    assert zeroshot.MindZeroShot().availability().ok


def test_dino_methods_run_end_to_end_with_a_tiny_local_model(tmp_path, monkeypatch, tiny_dino_model):
    """dino-zeroshot and dino-mind wire the DINO backend into ConvexAdam (a tiny random ViT: no weights needed)."""
    from dinoreg.features.dino import forget_loaded_backbones

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("DINOREG_CACHE", str(tmp_path / "dinoreg_cache"))
    fixed, moving, _ = shifted_pair(seed=7)
    fixed_volume = Volume.from_array_ras(fixed[0, 0].numpy() * 1000, (2.0, 2.0, 2.0))
    moving_volume = fixed_volume.with_array(moving[0, 0].numpy() * 1000)
    overrides = {"model": tiny_dino_model, "token_mm": 4.0, "slice_stride": 2, "pca_channels": 4}
    try:
        for method in (zeroshot.DinoZeroShot(), zeroshot.DinoMind()):
            stages = []
            progress = Progress(lambda stage, fraction, left: stages.append(stage))
            problem = RegistrationProblem(fixed_volume, moving_volume, params=method.parameters("fast", overrides),
                                          progress=progress)
            result = method.run(problem, Transform())
            assert result.dense is not None and np.isfinite(result.dense.displacement).all()
            assert "dino features" in stages and STAGE_ADAM in stages
            assert set(stages) <= set(method.stage_weights)
        # through the pipeline: availability is judged with the user's model, and 'auto' prefers dino-mind
        from dinoreg.app.pipeline import RegistrationOptions, register

        for name, expected in (("dino-zeroshot", "dino-zeroshot"), ("auto", "dino-mind")):
            options = RegistrationOptions(method=name, preset="fast", params=overrides, use_affine=False,
                                          compute_inverse=False, compute_jacobian=False)
            assert register(fixed_volume, moving_volume, options).report["method"] == expected
    finally:
        forget_loaded_backbones()


# --------------------------------------------------------------- end to end on a real brain

@pytest.fixture(scope="module")
def deformed_brain(brain_scan_2mm):
    """test_scan.npz at 2 mm (conftest), a known smooth deformation of it, and mind-zeroshot's result."""
    fixed_volume, label_volume = brain_scan_2mm
    image = torch.from_numpy(fixed_volume.array.astype(np.float32))[None, None]
    labels = torch.from_numpy(label_volume.array.astype(np.float32))[None, None]
    brain = labels[0, 0] > 0

    # moving(y) = fixed(y + v(y)); the field the registration should find is u = v^-1 (fixed -> moving)
    v = smooth_random_field(tuple(image.shape[2:]), 1.6, seed=3)
    moving = geometry.warp(image, v)
    moving_labels = geometry.warp(labels, v, mode="nearest")
    truth = geometry.invert(v, iterations=20)[0]

    moving_volume = fixed_volume.with_array(moving[0, 0].numpy())
    method = zeroshot.MindZeroShot()
    problem = RegistrationProblem(fixed_volume, moving_volume, params=method.parameters("brain-mr"))
    result = method.run(problem, Transform())
    return {
        "grid": fixed_volume.grid, "labels": labels[0, 0].numpy(), "moving_labels": moving_labels[0, 0].numpy(),
        "truth": truth, "brain": brain.numpy(), "result": result,
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    ids = [int(x) for x in np.unique(a) if x > 0 and (b == x).any()]
    return float(np.mean([2 * ((a == i) & (b == i)).sum() / ((a == i).sum() + (b == i).sum()) for i in ids]))


def test_mind_zeroshot_recovers_a_known_deformation(deformed_brain):
    grid, result, brain = deformed_brain["grid"], deformed_brain["result"], deformed_brain["brain"]
    assert result.dense is not None  # on the working grid: resampled onto the fixed grid to compare
    truth_mm = spatial.voxel_displacement_to_physical(deformed_brain["truth"], grid)[0].permute(1, 2, 3, 0).numpy()
    found_mm = result.dense.resampled_to(grid).displacement
    applied = np.linalg.norm(truth_mm, axis=-1)[brain].mean()
    error = np.linalg.norm(found_mm - truth_mm, axis=-1)[brain].mean()
    print(f"mean applied displacement {applied:.2f} mm, mean endpoint error {error:.2f} mm")
    assert applied > 2.5
    assert error < 0.4 * applied


def test_mind_zeroshot_improves_dice_of_warped_labels(deformed_brain):
    grid, labels, moving_labels = deformed_brain["grid"], deformed_brain["labels"], deformed_brain["moving_labels"]
    warped = warp_volume(Volume(moving_labels, grid), deformed_brain["result"], grid, mode="nearest").array
    before, after = dice(labels, moving_labels), dice(labels, warped)
    print(f"Dice unregistered {before:.3f}, registered {after:.3f}")
    assert after > before + 0.1


def test_sample_table_matches_grid_sample_values_gradients_and_border():
    """The Adam data term's channels-last trilinear gather equals grid_sample (border padding,
    align_corners) in values and position gradients, inside, at and beyond the border, and on a
    volume with a single slice."""
    import torch.nn.functional as F

    from dinoreg.optim.convex_adam import channels_last_table, sample_table

    generator = torch.Generator().manual_seed(3)
    for shape in [(5, 6, 7), (1, 6, 7)]:
        volume = torch.randn(1, 4, *shape, generator=generator, dtype=torch.float64)
        depth, height, width = shape
        extent = torch.tensor([depth - 1, height - 1, width - 1], dtype=torch.float64)  # positions are (k, j, i)
        positions = (torch.rand(500, 3, generator=generator, dtype=torch.float64) * 1.6 - 0.3) * extent
        positions[:3] = torch.tensor([[0.0, 0.0, 0.0], [depth - 1.0, height - 1.0, width - 1.0], [0.5, 9.0, -2.0]])
        ours_positions = positions.clone().requires_grad_(True)
        ours = sample_table(channels_last_table(volume), shape, ours_positions)
        (ours * torch.arange(1, 5, dtype=torch.float64)).sum().backward()
        theirs_positions = positions.clone().requires_grad_(True)
        scale = 2.0 / torch.clamp(extent, min=1.0)
        grid = (theirs_positions * scale - 1.0).flip(-1).view(1, 1, 1, -1, 3)  # grid_sample wants (x=i, y=j, z=k)
        theirs = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True).view(4, -1).t()
        (theirs * torch.arange(1, 5, dtype=torch.float64)).sum().backward()
        assert torch.allclose(ours, theirs, atol=1e-12)
        # gradients agree except on integer coordinates (one-sided there: either side is a valid slope)
        distance_to_knot = (positions - positions.round()).abs()[:, extent > 0]  # a single-slice axis is always on one
        off_knots = distance_to_knot.min(dim=1).values > 1e-6
        assert off_knots.sum() > 400
        assert torch.allclose(ours_positions.grad[off_knots], theirs_positions.grad[off_knots], atol=1e-10)
        outside = ((positions < 0) | (positions > extent)).any(dim=1) & off_knots
        for axis in range(3):  # beyond the border along an axis: no gradient along it
            beyond = (positions[:, axis] < 0) | (positions[:, axis] > extent[axis])
            assert torch.all(ours_positions.grad[beyond, axis] == 0)
        assert outside.sum() > 50


@pytest.mark.parametrize("overrides", [
    {"adam_iterations": 4, "refine_iterations": 2},  # MIND on the working grid, NCC refinement on its own grid
    {"adam_iterations": 4, "refine_iterations": 2, "refine_similarity": "mind", "inverse_consistent": True},
])
def test_the_prepared_fixed_image_gives_the_same_transform(brain_scan_2mm, overrides):
    """``prepare`` (run by the pipeline while the affine stage runs in the background) computes ahead
    only what ``run`` computes itself: the same transform to the bit, here with a mask on each image
    (their normalisation rule) and both grids prepared. Each prepared value is taken once."""
    fixed, _ = brain_scan_2mm
    moving = fixed.with_array(np.roll(fixed.array, (1, -2, 2), axis=(0, 1, 2)) * 1.3 + 5.0)
    fixed_mask = fixed.with_array((fixed.array > np.percentile(fixed.array, 40)).astype(np.uint8))
    moving_mask = moving.with_array((moving.array > np.percentile(moving.array, 40)).astype(np.uint8))
    method = zeroshot.MindZeroShot()
    params = method.parameters(overrides=overrides)
    results = []
    for prepared in (False, True):
        problem = RegistrationProblem(fixed, moving, fixed_mask, moving_mask, params=params)
        if prepared:
            method.prepare(problem)
            assert len(problem.prepared) == 2  # the working grid and the refinement's
        results.append(method.run(problem, Transform()))
        assert problem.prepared == {}
    np.testing.assert_array_equal(results[0].dense.displacement, results[1].dense.displacement)
    assert results[0].dense.grid.same_as(results[1].dense.grid)
