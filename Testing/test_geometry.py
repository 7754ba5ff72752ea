"""The differentiable geometry core against analytic cases and against MONAI's equivalents."""

from __future__ import annotations

import math

import pytest
import torch

from dinoreg.core.geometry import (bending_energy, compose, diffusion_gradient, diffusion_penalty, identity_grid, integrate_velocity, invert, jacobian_determinant, resize_field, warp)


def central_ball(shape, radius: float) -> torch.Tensor:
    grid = identity_grid(shape)[0]
    centre = torch.tensor([(n - 1) / 2 for n in shape]).view(3, 1, 1, 1)
    return (grid - centre).norm(dim=0) <= radius


def smooth_random_field(shape, amplitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth field: per channel a sum of random low-frequency sines, scaled to ``amplitude`` voxels."""
    generator = torch.Generator().manual_seed(seed)
    grid = identity_grid(shape, dtype=torch.float64)[0]
    sizes = torch.tensor([float(n) for n in shape], dtype=torch.float64).view(3, 1, 1, 1)
    field = torch.zeros((3, *shape), dtype=torch.float64)
    for channel in range(3):
        for _ in range(3):
            frequency = torch.rand(3, 1, 1, 1, generator=generator, dtype=torch.float64)
            phase = float(torch.rand(1, generator=generator)) * 2 * math.pi
            field[channel] += torch.sin((2 * math.pi * frequency * grid / sizes).sum(0) + phase)
    return (field * (amplitude / field.abs().max())).unsqueeze(0)


def test_identity_grid_holds_voxel_indices_in_axis_order():
    grid = identity_grid((2, 3, 4))
    assert grid.shape == (1, 3, 2, 3, 4)
    assert grid[0, :, 1, 2, 3].tolist() == [1.0, 2.0, 3.0]


def test_warp_by_whole_voxels_shifts_along_the_right_axis_and_keeps_labels():
    image = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(1, 1, 5, 6, 7)
    for channel in range(3):
        shift = torch.zeros((1, 3, 5, 6, 7))
        shift[:, channel] = 1.0
        warped = warp(image, shift)
        expected = image.narrow(channel + 2, 1, image.shape[channel + 2] - 1)
        torch.testing.assert_close(warped.narrow(channel + 2, 0, image.shape[channel + 2] - 1), expected)
    labels = torch.randint(0, 5, (1, 1, 5, 6, 7), dtype=torch.int16)
    moved = warp(labels, torch.full((1, 3, 5, 6, 7), 0.4), mode="nearest")
    assert moved.dtype == torch.int16
    torch.testing.assert_close(moved, labels)


def test_warp_integrate_and_bending_equal_monai():
    from monai.losses import BendingEnergyLoss
    from monai.networks.blocks import DVF2DDF, Warp

    shape = (9, 10, 11)
    image = torch.randn((2, 2, *shape), dtype=torch.float64)
    field = torch.cat([smooth_random_field(shape, 3.0, seed) for seed in (1, 2)])
    for mode in ("bilinear", "nearest"):
        torch.testing.assert_close(warp(image, field, mode), Warp(mode, "border")(image, field))
    torch.testing.assert_close(integrate_velocity(field, 5), DVF2DDF(5, padding_mode="border")(field))
    torch.testing.assert_close(bending_energy(field), BendingEnergyLoss()(field))


def test_rotation_velocity_integrates_to_the_rotation():
    shape = (24, 24, 24)
    theta = 0.5  # radians about the D axis (a rotation in the (H, W) plane)
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    relative = identity_grid(shape, dtype=torch.float64) - centre
    velocity = torch.zeros_like(relative)
    velocity[:, 1] = -theta * relative[:, 2]
    velocity[:, 2] = theta * relative[:, 1]
    displacement = integrate_velocity(velocity, steps=10)
    rotated = relative.clone()
    rotated[:, 1] = math.cos(theta) * relative[:, 1] - math.sin(theta) * relative[:, 2]
    rotated[:, 2] = math.sin(theta) * relative[:, 1] + math.cos(theta) * relative[:, 2]
    expected = rotated - relative
    inside = central_ball(shape, 9.0)
    error = (displacement - expected).norm(dim=1)[0][inside]
    assert float(error.max()) < 0.02
    # the rotation keeps volume: det J = 1
    assert float((jacobian_determinant(displacement)[0, 0][inside] - 1).abs().max()) < 0.01


def test_diffusion_gradient_equals_autograd():
    field = smooth_random_field((7, 8, 9), 2.0) + 0.1 * torch.randn((1, 3, 7, 8, 9), dtype=torch.float64)
    for spacing in (None, (3.0, 1.0, 0.5)):
        parameter = field.clone().requires_grad_(True)
        diffusion_penalty(parameter, spacing).backward()
        torch.testing.assert_close(diffusion_gradient(field, spacing), parameter.grad)


def test_diffusion_and_bending_of_known_fields():
    shape = (6, 7, 8)
    grid = identity_grid(shape, dtype=torch.float64)
    # u = 0.5 * x_H along W: derivative 0.5 on one axis -> diffusion = mean over the 3 channels = 0.25 / 3
    shear = torch.zeros((1, 3, *shape), dtype=torch.float64)
    shear[:, 2] = 0.5 * grid[:, 1]
    assert float(diffusion_penalty(shear)) == pytest.approx(0.25 / 3)
    # with 2 mm voxels along H and 1 mm along W: du_W(mm)/dx_H(mm) = 0.5 * 1 / 2
    assert float(diffusion_penalty(shear, (1.0, 2.0, 1.0))) == pytest.approx(0.0625 / 3)
    assert float(bending_energy(shear)) == pytest.approx(0.0, abs=1e-12)  # affine: no bending
    # u_D = x_D^2: d2 = 2 on one channel -> bending = 4 / 3
    square = torch.zeros((1, 3, *shape), dtype=torch.float64)
    square[:, 0] = grid[:, 0] ** 2
    assert float(bending_energy(square)) == pytest.approx(4.0 / 3)


def test_jacobian_of_a_linear_field_is_its_determinant_everywhere():
    shape = (6, 7, 8)
    matrix = torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.0, 1.1]], dtype=torch.float64)
    grid = identity_grid(shape, dtype=torch.float64)
    displacement = torch.einsum("ab,nb...->na...", matrix - torch.eye(3, dtype=torch.float64), grid)
    determinant = jacobian_determinant(displacement)
    assert determinant.shape == (1, 1, *shape)
    torch.testing.assert_close(determinant, torch.full_like(determinant, float(torch.linalg.det(matrix))))
    # the same map given in mm on 2 x 1 x 0.5 mm voxels has the same determinant
    spacing = (2.0, 1.0, 0.5)
    in_mm = displacement * torch.tensor(spacing, dtype=torch.float64).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(jacobian_determinant(in_mm, spacing), determinant)


def test_inverse_round_trips_in_both_directions_and_reports_its_residual():
    shape = (20, 22, 24)
    displacement = smooth_random_field(shape, 2.0, seed=3)
    assert float(jacobian_determinant(displacement).min()) > 0.2
    inverse, residual = invert(displacement, iterations=50, tolerance=1e-4)
    inside = central_ball(shape, 6.0)
    forward_then_back = compose(displacement, inverse).norm(dim=1)[0][inside]
    back_then_forward = compose(inverse, displacement).norm(dim=1)[0][inside]
    assert float(forward_then_back.max()) < 0.05 and float(back_then_forward.max()) < 0.05
    torch.testing.assert_close(residual[0, 0], compose(inverse, displacement).norm(dim=1)[0])
    assert float(residual.amax()) < 1e-3
    # a folding field cannot be inverted: the residual says so
    _, bad = invert(smooth_random_field(shape, 40.0, seed=4), iterations=10)
    assert float(bad.amax()) > 1.0


def test_accelerated_inverse_reaches_the_fixed_point_in_a_third_of_the_plain_iterations():
    """Anderson acceleration: 10 evaluations of ``u`` invert a strong smooth field better than 30 plain
    fixed-point steps ``v <- -u(x + v)`` (the engine's earlier inverse), nearer the same fixed point."""
    displacement = smooth_random_field((24, 26, 28), 3.5, seed=5)
    assert float(jacobian_determinant(displacement).min()) > 0.1
    plain = -displacement
    for _ in range(30):
        plain = -warp(displacement, plain)
    plain_residual = (plain + warp(displacement, plain)).norm(dim=1)
    accelerated, residual = invert(displacement, iterations=10, tolerance=0.0)
    assert float(torch.quantile(residual.flatten(), 0.99)) < 0.5 * float(torch.quantile(plain_residual.flatten(), 0.99))
    converged, _ = invert(displacement, iterations=60, tolerance=0.0)

    def p99_distance(field: torch.Tensor) -> float:
        return float(torch.quantile((field - converged).norm(dim=1).flatten(), 0.99))

    assert p99_distance(accelerated) < 0.6 * p99_distance(plain)
    # stopped by the quantile rule: 99 % of the voxels within the tolerance
    _, early = invert(displacement, iterations=60, tolerance=0.01, quantile=0.99)
    assert float(torch.quantile(early.flatten(), 0.99)) < 0.01


def test_compose_of_translations_adds_them():
    shape = (8, 8, 8)
    a = torch.zeros((1, 3, *shape))
    b = torch.zeros((1, 3, *shape))
    a[:, 0], b[:, 2] = 1.0, -2.0
    torch.testing.assert_close(compose(a, b), a + b)


def test_resize_field_keeps_the_physical_map():
    # a field on 33 voxels resized to 17 voxels over the same box: voxels twice as large
    shape, small = (33, 33, 33), (17, 17, 17)
    field = torch.zeros((1, 3, *shape), dtype=torch.float64)
    field[:, 0] = 4.0
    field[:, 1] = 0.25 * identity_grid(shape, dtype=torch.float64)[:, 2]  # linear in W
    resized = resize_field(field, small)
    assert resized.shape == (1, 3, *small)
    torch.testing.assert_close(resized[:, 0], torch.full_like(resized[:, 0], 2.0))
    # physical position W (in large voxels) = 2 * W_small; displacement 0.25 * 2 W_small large voxels = 0.25 W_small small voxels
    torch.testing.assert_close(resized[:, 1], 0.25 * identity_grid(small, dtype=torch.float64)[:, 2])
    torch.testing.assert_close(resize_field(resized, shape), field)


def test_everything_is_differentiable_with_batches():
    shape = (6, 7, 8)
    image = torch.randn((2, 1, *shape), dtype=torch.float64)
    field = (0.5 * torch.randn((2, 3, *shape), dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: warp(image, u), (field,), eps=1e-6, atol=1e-4)
    loss = (warp(image, integrate_velocity(field, 3)).square().mean() + bending_energy(field)
            + jacobian_determinant(field).mean() + diffusion_penalty(field, (1.0, 2.0, 3.0)))
    loss.backward()
    assert field.grad is not None and torch.isfinite(field.grad).all() and field.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_the_gpu():
    field = smooth_random_field((8, 8, 8), 1.0).float().cuda()
    image = torch.rand((1, 1, 8, 8, 8), device="cuda")
    assert warp(image, integrate_velocity(field)).device.type == "cuda"
    assert invert(field)[0].device.type == "cuda"


def test_upsample_field_matches_average_pooled_pyramids():
    from dinoreg.core.geometry import upsample_field

    coarse = torch.zeros((1, 3, 4, 4, 4), dtype=torch.float64)
    coarse[:, 0] = 1.5
    coarse[:, 2] = 0.25 * identity_grid((4, 4, 4), dtype=torch.float64)[:, 2]  # linear in W (coarse voxels)
    fine = upsample_field(coarse, 2)
    assert fine.shape == (1, 3, 8, 8, 8)
    torch.testing.assert_close(fine[:, 0], torch.full_like(fine[:, 0], 3.0))
    # coarse voxel m is centred on fine position 2 m + 0.5: u_fine(x) = 0.25 (x - 0.5) inside
    w = identity_grid((8, 8, 8), dtype=torch.float64)[:, 2]
    torch.testing.assert_close(fine[:, 2, :, :, 1:-1], (0.25 * (w - 0.5))[:, :, :, 1:-1])


@pytest.mark.parametrize("mode, padding_mode", [("bilinear", "border"), ("nearest", "border"), ("bilinear", "zeros")])
def test_grid_sample_3d_splits_over_threads_with_the_values_and_gradients_of_grid_sample(mode, padding_mode):
    """The threaded sampler (one batch entry per thread) equals F.grid_sample: values exactly,
    gradients for the image and the grid to float rounding; also with a point count that does not
    divide by the thread count."""
    import torch.nn.functional as F

    from dinoreg.core.geometry import grid_sample_3d

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 20, 22, 24, generator=generator, dtype=torch.float64)
    grid = torch.rand(1, 41, 43, 47, 3, generator=generator, dtype=torch.float64) * 2.4 - 1.2  # 82861 points, some outside
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        ours_image, ours_grid = image.clone().requires_grad_(True), grid.clone().requires_grad_(True)
        ours = grid_sample_3d(ours_image, ours_grid, mode, padding_mode)
        (ours * torch.linspace(0, 1, ours.numel(), dtype=torch.float64).view_as(ours)).sum().backward()
    finally:
        torch.set_num_threads(threads)
    theirs_image, theirs_grid = image.clone().requires_grad_(True), grid.clone().requires_grad_(True)
    theirs = F.grid_sample(theirs_image, theirs_grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    (theirs * torch.linspace(0, 1, theirs.numel(), dtype=torch.float64).view_as(theirs)).sum().backward()
    assert ours.shape == theirs.shape == (1, 3, 41, 43, 47)
    assert torch.equal(ours, theirs)
    assert torch.allclose(ours_image.grad, theirs_image.grad, rtol=1e-10, atol=1e-12)
    if mode == "bilinear":
        assert torch.allclose(ours_grid.grad, theirs_grid.grad, rtol=1e-10, atol=1e-12)
        assert ours_grid.grad.abs().max() > 0
