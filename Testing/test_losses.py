"""Registration losses: hand-computed values, invariances, and that the right field scores best."""

from __future__ import annotations

import pytest
import torch

from dinoreg.losses import (RegistrationLoss, dice_loss, inverse_consistency_loss, local_ncc_loss, mind_loss, mse_loss, one_hot)


def blob_image(shape=(16, 18, 20), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, 4, 5, 5), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def translation(shape, voxels) -> torch.Tensor:
    field = torch.zeros((1, 3, *shape))
    for channel, value in enumerate(voxels):
        field[:, channel] = value
    return field


def test_local_ncc_is_zero_for_scaled_intensities_and_positive_otherwise():
    # (MONAI pads with zeros, so an intensity offset is not invariant at the border; a scale is)
    image = blob_image()
    assert float(local_ncc_loss(image, 2.0 * image, window=5)) == pytest.approx(0.0, abs=1e-3)
    assert float(local_ncc_loss(image, blob_image(seed=1), window=5)) > 0.3
    with pytest.raises(ValueError):
        local_ncc_loss(image, image, window=4)


def test_mse_and_dice_hand_computed():
    a = torch.zeros((1, 1, 4, 4, 4))
    assert float(mse_loss(a, a + 0.5)) == pytest.approx(0.25)
    labels = torch.zeros((1, 1, 4, 4, 4), dtype=torch.int64)
    labels[..., :2] = 1
    shifted = torch.zeros_like(labels)
    shifted[..., 1:3] = 1  # half of each box overlaps: Dice 0.5
    fixed, moving = one_hot(labels, [1]), one_hot(shifted, [1])
    assert fixed.shape == (1, 1, 4, 4, 4)
    assert float(dice_loss(fixed, fixed)) == pytest.approx(0.0, abs=1e-5)
    assert float(dice_loss(fixed, moving)) == pytest.approx(0.5, abs=1e-4)


def test_mind_loss_prefers_the_true_translation():
    shape = (16, 18, 20)
    fixed = blob_image(shape)
    shift = translation(shape, (0.0, 2.0, 0.0))
    moving = torch.roll(fixed, shifts=2, dims=3)  # moving(x + 2 along H) = fixed(x)
    assert float(mind_loss(fixed, fixed, torch.zeros_like(shift))) == pytest.approx(0.0, abs=1e-7)
    assert float(mind_loss(fixed, moving, shift)) < 0.5 * float(mind_loss(fixed, moving, torch.zeros_like(shift)))


def test_inverse_consistency_of_translations():
    shape = (6, 6, 6)
    t = translation(shape, (1.0, -2.0, 0.5))
    assert float(inverse_consistency_loss(t, -t)) == pytest.approx(0.0, abs=1e-10)
    assert float(inverse_consistency_loss(t, t)) == pytest.approx(4 * (1 + 4 + 0.25))


def test_registration_loss_sums_its_weighted_terms_and_has_gradients():
    shape = (12, 12, 12)
    fixed = blob_image(shape)
    moving = torch.roll(fixed, shifts=1, dims=2)
    labels = (fixed > 0.5).long()
    field = torch.zeros((1, 3, *shape), requires_grad=True)
    loss = RegistrationLoss({"lncc": 1.0, "mse": 0.5, "dice": 1.0, "diffusion": 0.1, "bending": 0.1},
                            lncc_window=5, label_ids=[1], spacing=(1.0, 1.0, 2.0))
    total = loss(fixed, moving, field, labels, torch.roll(labels, 1, 2))
    assert float(total) == pytest.approx(sum(loss.parts.values()), rel=1e-5)
    assert set(loss.parts) == {"lncc", "mse", "dice", "diffusion", "bending"}
    total.backward()
    assert field.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown loss terms"):
        RegistrationLoss({"ncc": 1.0})
