"""Losses of registration networks and instance optimisation, as plain functions on batched tensors.

Images are ``(N, C, D, H, W)``; displacement fields ``(N, 3, D, H, W)`` in voxels with channel k
along tensor axis k + 2 (see ``geometry``); spacings are (sD, sH, sW) mm. Every loss is a scalar
that is 0 (or its minimum) for a perfect match and differentiable with respect to the field.

- similarities (``similarity.py``): :func:`local_ncc_loss` (MONAI's LocalNormalizedCrossCorrelationLoss,
  as 1 - LNCC), :func:`mse_loss`, :func:`mind_loss` (MIND-SSC of both images, moving features warped);
- label overlap (``labels.py``): :func:`one_hot`, :func:`dice_loss` (soft Dice of warped one-hot maps, MONAI's DiceLoss);
- regularisers (``regularisation.py``): :func:`diffusion_penalty`, :func:`bending_energy` (from the
  geometry core) and :func:`inverse_consistency_loss`;
- :class:`RegistrationLoss` (``combined.py``): a weighted sum of the above from a dict of weights,
  returning the total and each term (for logs).

MONAI is imported lazily inside the functions that use it (importing it costs seconds).
"""

from __future__ import annotations

from dinoreg.core.geometry import bending_energy, diffusion_penalty
from dinoreg.losses.combined import LOSS_TERMS, RegistrationLoss
from dinoreg.losses.labels import dice_loss, one_hot
from dinoreg.losses.regularisation import inverse_consistency_loss
from dinoreg.losses.similarity import local_ncc_loss, mind_loss, mse_loss

__all__ = ["local_ncc_loss", "mse_loss", "mind_loss", "one_hot", "dice_loss", "diffusion_penalty", "bending_energy",
           "inverse_consistency_loss", "RegistrationLoss", "LOSS_TERMS"]
