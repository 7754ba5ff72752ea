"""Geometry and transform model: our resampling agrees with SimpleITK's, inverses invert,
Jacobians match hand-computed values, files round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from dinoreg.core import geometry
from dinoreg.core import spatial
from dinoreg.io.itk_files import read_transform, to_sitk_transform, write_transform
from dinoreg.core.transforms import AffineMap, DenseField, Transform, transform_jacobian, warp_volume
from dinoreg.core.volume import Grid, Volume


def rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


OBLIQUE = rotation(2, 20) @ rotation(0, -15) @ np.diag([1.0, -1.0, 1.0])


def smooth_field(grid: Grid, amplitude_mm: float, sigma_voxels: float, seed: int = 0) -> DenseField:
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(*grid.shape, 3))
    smooth = np.stack([ndimage.gaussian_filter(noise[..., c], sigma_voxels) for c in range(3)], axis=-1)
    return DenseField(smooth / np.abs(smooth).max() * amplitude_mm, grid)


def blob_volume(grid: Grid) -> Volume:
    points = grid.physical_points() - grid.centre()
    radius = np.linalg.norm(points / (grid.extent_mm / 3.0), axis=-1)
    ripples = np.cos(points[..., 0] / 4.0) * np.sin(points[..., 1] / 5.0)
    return Volume((1000 * np.exp(-radius ** 2) * (1.2 + 0.3 * ripples)).astype(np.float32), grid)


def test_index_physical_round_trip_with_oblique_direction():
    grid = Grid((20, 30, 10), origin=(5, -7, 12), spacing=(0.8, 1.2, 3.0), direction=OBLIQUE)
    reference = grid.to_sitk_reference()
    for index in [(0, 0, 0), (3.5, 7.25, 2.0), (19, 29, 9)]:
        expected = reference.TransformContinuousIndexToPhysicalPoint(index)
        ours = grid.index_to_physical @ np.array([*index, 1.0])
        np.testing.assert_allclose(ours[:3], expected, atol=1e-9)
    points = grid.physical_points()
    np.testing.assert_allclose(points[2, 5, 7], reference.TransformIndexToPhysicalPoint((7, 5, 2)), atol=1e-9)


def test_itk_composite_applies_last_added_first():
    """The fact ``itk_files`` relies on when it adds our steps in reverse order."""
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.TranslationTransform(3, (1, 0, 0)))
    composite.AddTransform(sitk.ScaleTransform(3, (2, 2, 2)))
    assert composite.TransformPoint((1, 1, 1)) == pytest.approx((3, 2, 2))
    ours = Transform([AffineMap(np.eye(3) * 2), AffineMap(np.eye(3), np.array([1.0, 0, 0]))])
    assert to_sitk_transform(ours).TransformPoint((1, 1, 1)) == pytest.approx((3, 2, 2))


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_warp_matches_simpleitk_on_oblique_anisotropic_grids(mode):
    fixed_grid = Grid((40, 36, 12), origin=(-20, 15, -30), spacing=(1.1, 1.3, 4.0), direction=OBLIQUE)
    moving_grid = Grid((30, 34, 28), origin=(-25, -30, -40), spacing=(1.5, 1.5, 1.5), direction=rotation(1, 10))
    moving = blob_volume(moving_grid)
    if mode == "nearest":
        moving = moving.with_array((moving.array > 600).astype(np.int16) + (moving.array > 1000))
    transform = Transform([smooth_field(fixed_grid, 3.0, 3.0),
                           AffineMap(rotation(2, 5) * 1.03, np.array([2.0, -1.0, 3.0]))])
    ours = warp_volume(moving, transform, fixed_grid, mode)
    interpolator = sitk.sitkLinear if mode == "linear" else sitk.sitkNearestNeighbor
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving.to_sitk(), fixed_grid.to_sitk_reference(),
                                                  to_sitk_transform(transform), interpolator, 0.0,
                                                  moving.to_sitk().GetPixelID()))
    assert ours.array.dtype == moving.array.dtype
    difference = np.abs(ours.array.astype(np.float64) - theirs)
    if mode == "linear":
        assert difference.max() < 1e-2 * np.ptp(moving.array)
    else:
        assert (difference > 0).mean() < 1e-3  # ties at exactly half-voxel positions may round differently


def test_transform_file_round_trip(tmp_path):
    grid = Grid((16, 18, 20), origin=(1, 2, 3), spacing=(1.0, 2.0, 1.5), direction=OBLIQUE)
    transform = Transform([smooth_field(grid, 2.0, 2.0), AffineMap(rotation(0, 7) * 0.95, np.array([1.0, 2.0, 3.0]))])
    path = write_transform(transform, tmp_path / "t.h5")
    loaded = read_transform(path)
    assert [type(s) for s in loaded.steps] == [DenseField, AffineMap]
    points = torch.randn(4, 5, 6, 3) * 10
    torch.testing.assert_close(loaded.apply(points), transform.apply(points), atol=1e-4, rtol=0)


def test_scaling_and_squaring_of_constant_velocity_is_a_translation():
    velocity = torch.zeros(1, 3, 12, 14, 16)
    velocity[:, 0] = 1.5
    displacement = geometry.integrate_velocity(velocity, steps=6)
    torch.testing.assert_close(displacement[:, :, 3:-3, 3:-3, 3:-3], velocity[:, :, 3:-3, 3:-3, 3:-3], atol=1e-4, rtol=0)


def test_scaling_and_squaring_is_diffeomorphic_for_large_smooth_velocity():
    grid = Grid((32, 32, 32))
    velocity = spatial.physical_displacement_to_voxel(smooth_field(grid, 6.0, 4.0, seed=3).as_tensor(), grid)
    field = DenseField.from_voxel_displacement(geometry.integrate_velocity(velocity, steps=7), grid)
    jacobian = transform_jacobian(Transform([field]), grid)
    assert jacobian.min() > 0


def test_inverse_round_trip_below_half_voxel_in_the_interior():
    grid = Grid((48, 40, 36), origin=(0, 0, 0), spacing=(1.0, 1.2, 1.5), direction=OBLIQUE)
    transform = Transform([smooth_field(grid, 4.0, 4.0, seed=1), AffineMap(rotation(1, 8) * 1.05, np.array([3.0, 0, -2]))])
    inverse = transform.inverse()
    points = spatial.grid_points(grid)[6:-6, 6:-6, 6:-6]
    round_trip = inverse.apply(transform.apply(points))
    error_voxels = ((round_trip - points).norm(dim=-1) / grid.spacing.min()).numpy()
    assert error_voxels.max() < 0.5
    assert error_voxels.mean() < 0.05


def test_jacobian_of_affine_is_its_determinant():
    grid = Grid((10, 12, 14), spacing=(1.0, 2.0, 0.5), direction=OBLIQUE)
    matrix = rotation(2, 30) @ np.diag([1.1, 0.9, 1.2])
    jacobian = transform_jacobian(Transform([AffineMap(matrix, np.array([5.0, 1, 2]))]), grid)
    np.testing.assert_allclose(jacobian, 1.1 * 0.9 * 1.2, rtol=1e-5)


def test_jacobian_of_linear_dense_field_matches_hand_computation():
    """u(x) = (0.2 * x_L, -0.1 * y_P, 0): J = (1 + 0.2) * (1 - 0.1) = 1.08, on an oblique grid."""
    grid = Grid((12, 10, 8), origin=(3, 4, 5), spacing=(1.5, 1.0, 2.0), direction=OBLIQUE)
    points = grid.physical_points()
    displacement = np.zeros_like(points)
    displacement[..., 0] = 0.2 * points[..., 0]
    displacement[..., 1] = -0.1 * points[..., 1]
    jacobian = transform_jacobian(Transform([DenseField(displacement, grid)]), grid)
    np.testing.assert_allclose(jacobian, 1.08, rtol=1e-4)


def test_jacobian_detects_folding():
    grid = Grid((20, 8, 8))
    displacement = np.zeros((*grid.shape, 3), dtype=np.float32)
    i = np.arange(20)
    displacement[..., 0] = np.where((i >= 8) & (i < 12), -2.0 * (i - 8), 0.0)[None, None, :]
    jacobian = transform_jacobian(Transform([DenseField(displacement, grid)]), grid)
    assert jacobian[4, 4, 9] == pytest.approx(-1.0)
    assert jacobian[4, 4, 2] == pytest.approx(1.0)


def test_dense_field_inverse_on_coarse_grid_for_large_fields():
    grid = Grid((40, 40, 40))
    field = smooth_field(grid, 3.0, 5.0, seed=4)
    coarse = field.inverse(max_voxels=20_000)
    exact = field.inverse()
    interior = (slice(5, -5),) * 3
    assert np.abs(coarse.displacement[interior] - exact.displacement[interior]).max() < 0.25


@pytest.mark.parametrize("with_affine", [False, True])
def test_field_on_a_coarser_grid_over_the_same_box_maps_points_like_simpleitk(with_affine):
    """Our methods' fields live on a coarser grid over the fixed image's box: mapping the fixed grid
    upsamples them (the affine folded in) and must give what sampling at every point gives, and
    what SimpleITK's displacement-field transform gives."""
    grid = Grid((34, 30, 26), origin=(-20, 15, -30), spacing=(1.1, 1.3, 1.6), direction=OBLIQUE)
    coarse = grid.with_spacing(2.7)
    assert coarse.same_box_as(grid) and not coarse.same_as(grid)
    assert not Grid(grid.size, origin=(-19, 15, -30), spacing=grid.spacing, direction=OBLIQUE).same_box_as(grid)
    field = smooth_field(coarse, 3.0, 2.0)
    steps = [field] + ([AffineMap(rotation(2, 6) * 1.04, np.array([3.0, -2.0, 2.5]))] if with_affine else [])
    transform = Transform(steps)
    points = spatial.grid_points(grid)
    ours = transform.mapped_points(grid)
    torch.testing.assert_close(ours, transform.apply(points), atol=1e-4, rtol=0)
    itk = to_sitk_transform(transform)
    sample = points.reshape(-1, 3)[::97].double().numpy()
    theirs = np.array([itk.TransformPoint(tuple(p)) for p in sample])
    assert np.abs(ours.reshape(-1, 3)[::97].double().numpy() - theirs).max() < 1e-3


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_affine_then_field_on_the_target_grid_matches_simpleitk(mode):
    """Issue 7 bug 2: an inverse chain is ``[affine^-1, field on the fixed grid]``; applied onto that
    same grid, the field must be read where the affine sent each point, not at the grid point."""
    grid = Grid((34, 30, 26), origin=(-20, 15, -30), spacing=(1.1, 1.3, 1.6), direction=OBLIQUE)
    moving = blob_volume(grid)
    if mode == "nearest":
        moving = moving.with_array((moving.array > 600).astype(np.int16) + (moving.array > 1000))
    transform = Transform([AffineMap(rotation(2, 6) * 1.04, np.array([3.0, -2.0, 2.5])), smooth_field(grid, 3.0, 3.0)])
    points = spatial.grid_points(grid)
    torch.testing.assert_close(transform.mapped_points(grid), transform.apply(points), atol=1e-4, rtol=0)
    ours = warp_volume(moving, transform, grid, mode)
    interpolator = sitk.sitkLinear if mode == "linear" else sitk.sitkNearestNeighbor
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving.to_sitk(), grid.to_sitk_reference(), to_sitk_transform(transform),
                                                  interpolator, 0.0, moving.to_sitk().GetPixelID()))
    difference = np.abs(ours.array.astype(np.float64) - theirs)
    if mode == "linear":
        assert difference.max() < 1e-2 * np.ptp(moving.array)
    else:
        assert (difference > 0).mean() < 1e-3


def test_inverse_of_a_registration_chain_resamples_like_simpleitk():
    """``dinoreg apply inverse_transform.h5 FIXED -r MOVING`` when fixed and moving share a grid."""
    grid = Grid((30, 28, 24), origin=(0, 0, 0), spacing=(1.0, 1.0, 1.2), direction=OBLIQUE)
    transform = Transform([smooth_field(grid, 3.0, 4.0, seed=2), AffineMap(rotation(0, 5) * 1.02, np.array([2.0, 1.0, -1.5]))])
    inverse = transform.inverse()
    fixed = blob_volume(grid)
    ours = warp_volume(fixed, inverse, grid).array
    theirs = sitk.GetArrayFromImage(sitk.Resample(fixed.to_sitk(), grid.to_sitk_reference(), to_sitk_transform(inverse),
                                                  sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert np.abs(ours - theirs).max() < 1e-2 * np.ptp(fixed.array)


def test_resample_without_transform_equals_the_engine_identity_warp():
    """The unregistered views (SimpleITK's resampler) and the engine's identity warp give the same
    values: oblique, anisotropic grids, partly outside the moving image (0 there), images and labels."""
    import SimpleITK as sitk

    from dinoreg.core.transforms import Transform, resample_without_transform, warp_volume
    from dinoreg.core.volume import Grid, Volume

    rng = np.random.default_rng(2)
    image = sitk.GetImageFromArray(rng.random((12, 14, 16)).astype(np.float32) * 100)
    image.SetSpacing((1.5, 1.0, 2.0))
    image.SetOrigin((3.0, -4.0, 5.0))
    angle = 0.3
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    moving = Volume.from_sitk(image)
    labels = Volume(rng.integers(0, 5, (12, 14, 16)).astype(np.int16), moving.grid)
    reference = sitk.Image([20, 18, 15], sitk.sitkUInt8)
    reference.SetSpacing((1.2, 1.1, 1.3))
    reference.SetOrigin((-2.0, -8.0, 1.05))  # no exact half-voxel ties (ITK rounds them up, torch to even)
    target = Grid.from_sitk(reference)
    ours = resample_without_transform(moving, target, "linear")
    engine = warp_volume(moving, Transform(), target, "linear")
    assert ours.array.dtype == np.float32 and ours.grid.same_as(target)
    assert np.abs(ours.array - engine.array).max() < 1e-3
    assert (ours.array == 0).mean() > 0.1 and (ours.array > 0).mean() > 0.3  # partly outside, partly inside
    ours_labels = resample_without_transform(labels, target, "nearest")
    engine_labels = warp_volume(labels, Transform(), target, "nearest")
    assert ours_labels.array.dtype == np.int16
    assert np.array_equal(ours_labels.array, engine_labels.array)
