"""A weighted sum of registration losses, configured by a dict of weights (e.g. from a config file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from dinoreg.core.geometry import bending_energy, diffusion_penalty, warp
from dinoreg.losses.labels import dice_loss, one_hot
from dinoreg.losses.regularisation import inverse_consistency_loss
from dinoreg.losses.similarity import local_ncc_loss, mind_loss, mse_loss

#: the term names a weight dict may use
LOSS_TERMS = ("lncc", "mse", "mind", "dice", "diffusion", "bending", "inverse_consistency")


@dataclass
class RegistrationLoss:
    """``total = sum_t weights[t] * term_t``; terms with weight 0 are not computed.

    ``lncc_window`` is the local NCC window (voxels). ``label_ids`` are the labels whose soft Dice
    is used (needed for ``dice``). ``spacing`` (sD, sH, sW) mm makes the penalties physical.
    """

    weights: dict[str, float]
    lncc_window: int = 9
    label_ids: Sequence[int] = ()
    spacing: Sequence[float] | None = None
    mind_radius: int = 1
    mind_dilation: int = 2
    parts: dict[str, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}: use some of {list(LOSS_TERMS)}")
        if self.weights.get("dice", 0) and not self.label_ids:
            raise ValueError("the dice term needs label_ids (the labels whose overlap is scored)")

    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor,
                 fixed_labels: torch.Tensor | None = None, moving_labels: torch.Tensor | None = None,
                 backward: torch.Tensor | None = None) -> torch.Tensor:
        """Total loss of one batch; ``self.parts`` holds each weighted term's value (floats)."""
        w = {name: float(self.weights.get(name, 0.0)) for name in LOSS_TERMS}
        terms: dict[str, torch.Tensor] = {}
        if w["lncc"] or w["mse"]:
            warped = warp(moving, displacement)
            if w["lncc"]:
                terms["lncc"] = local_ncc_loss(fixed, warped, self.lncc_window)
            if w["mse"]:
                terms["mse"] = mse_loss(fixed, warped)
        if w["mind"]:
            terms["mind"] = mind_loss(fixed, moving, displacement, self.mind_radius, self.mind_dilation, self.spacing)
        if w["dice"] and fixed_labels is not None and moving_labels is not None:
            warped_labels = warp(one_hot(moving_labels, self.label_ids), displacement)
            terms["dice"] = dice_loss(one_hot(fixed_labels, self.label_ids), warped_labels)
        if w["diffusion"]:
            terms["diffusion"] = diffusion_penalty(displacement, self.spacing)
        if w["bending"]:
            terms["bending"] = bending_energy(displacement, self.spacing)
        if w["inverse_consistency"] and backward is not None:
            terms["inverse_consistency"] = inverse_consistency_loss(displacement, backward)
        total = displacement.new_zeros(())
        for name, value in terms.items():
            total = total + w[name] * value
        self.parts = {name: float(w[name] * value.detach()) for name, value in terms.items()}
        return total
