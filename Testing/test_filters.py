"""The engine's box filters (core/filters.py) against torch's own pooling: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinoreg.core.filters import box_mean


def volume(shape=(1, 3, 9, 11, 7), seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("radius", [1, 2, (1, 2, 0), (3, 1, 2)])
def test_exclude_border_equals_avg_pool_without_padding_counted(radius):
    """Windows that reach past the volume average only the voxels inside it (the NCC windows, the field smoothing)."""
    x = volume().requires_grad_(True)
    radii = (radius,) * 3 if isinstance(radius, int) else radius
    expected = F.avg_pool3d(x, tuple(2 * r + 1 for r in radii), stride=1, padding=tuple(radii), count_include_pad=False)
    ours = box_mean(x, radius)
    assert ours.shape == x.shape
    assert torch.allclose(ours, expected, atol=1e-12)
    weights = volume(seed=1)
    (gradient_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    (gradient_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    assert torch.allclose(gradient_ours, gradient_expected, atol=1e-12)


@pytest.mark.parametrize("radius", [1, (2, 1, 1)])
def test_replicate_border_equals_pooling_of_the_edge_padded_volume(radius):
    """MIND-SSC's patch distances: the volume extended by its edge voxels, then a plain box mean."""
    x = volume((1, 12, 6, 8, 5))
    rk, rj, ri = (radius,) * 3 if isinstance(radius, int) else radius
    padded = F.pad(x, (ri, ri, rj, rj, rk, rk), mode="replicate")
    expected = F.avg_pool3d(padded, (2 * rk + 1, 2 * rj + 1, 2 * ri + 1), stride=1)
    assert torch.allclose(box_mean(x, radius, border="replicate"), expected, atol=1e-12)


def test_windows_wider_than_the_volume_average_the_whole_axis():
    x = volume((1, 1, 2, 3, 4))
    assert torch.allclose(box_mean(x, 5), x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x), atol=1e-12)


def test_a_constant_is_unchanged_and_radius_zero_is_the_identity():
    x = torch.full((1, 2, 4, 5, 6), 0.7)
    assert torch.allclose(box_mean(x, 2), x) and torch.allclose(box_mean(x, 2, border="replicate"), x)
    y = volume()
    assert torch.equal(box_mean(y, 0), y)


def test_wrong_shapes_and_settings_are_refused():
    with pytest.raises(ValueError, match="N, C, K, J, I"):
        box_mean(torch.zeros(4, 5, 6), 1)
    with pytest.raises(ValueError, match="border"):
        box_mean(torch.zeros(1, 1, 4, 5, 6), 1, border="wrap")
    with pytest.raises(ValueError, match="radius"):
        box_mean(torch.zeros(1, 1, 4, 5, 6), (1, 2))


@pytest.mark.parametrize("border", ["exclude", "replicate"])
@pytest.mark.parametrize("radius", [1, 2, (3, 0, 1), (5, 1, 2)])
def test_the_same_values_to_the_bit_as_padding_then_summing_the_windows(border, radius):
    """The box sums are slab additions into the result, in the order of the windows' voxels: the values
    of padding the volume (zeros or edge voxels) and adding its 2r + 1 shifted views, exactly (float32)."""
    x = volume((1, 12, 7, 9, 4)).float()
    radii = (radius,) * 3 if isinstance(radius, int) else radius
    expected = x
    for axis, r in zip((2, 3, 4), radii):
        if r == 0:
            continue
        padding = [0] * 6
        padding[2 * (4 - axis)] = padding[2 * (4 - axis) + 1] = r
        padded = F.pad(expected, padding, mode="replicate" if border == "replicate" else "constant")
        length = expected.shape[axis]
        total = padded.narrow(axis, 0, length).clone()
        for shift in range(1, 2 * r + 1):
            total += padded.narrow(axis, shift, length)
        if border == "replicate":
            expected = total / (2 * r + 1)
        else:
            ones = F.pad(torch.ones(length), [r, r])
            count = sum(ones[shift:shift + length] for shift in range(2 * r + 1))
            shape = [1] * 5
            shape[axis] = length
            expected = total / count.view(shape)
    assert torch.equal(box_mean(x, radius, border=border), expected)
