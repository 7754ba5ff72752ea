"""Differentiable geometry on batched voxel displacement fields: the single home of warping,
composition, integration, inversion, Jacobians and smoothness penalties.

Every function here works on batched torch tensors, on any device, and is autograd-safe (except
:func:`invert`'s accelerated fixed-point loop, which is not meant to be trained through).

Conventions (read these once):

- A *displacement field* ``u`` is a tensor ``(N, 3, D, H, W)`` in **voxels** of the grid it is
  sampled on. **Channel k is the displacement along tensor axis k + 2**: channel 0 along D,
  1 along H, 2 along W. For an engine ``Grid`` with arrays ``[k, j, i]`` that is (dk, dj, di).
  This is THE channel convention of every voxel displacement tensor in the engine (ConvexAdam,
  refinement, networks, ``spatial.py``, ``transforms.DenseField``, ``methods/base.dense_result``);
  other modules refer here instead of restating it. Other orders exist only at two boundaries:
  physical displacements (LPS mm, ITK's (x, y, z) components), converted in one place,
  ``spatial.voxel_displacement_to_physical`` / ``physical_displacement_to_voxel``; and
  ``F.grid_sample``'s (x=W, y=H, z=D) coordinates, built from a displacement only by
  ``fields.sampling_grid`` (other samplers build them from positions, not displacements:
  ``spatial.physical_to_normalised``, ``convex_adam.resample_lattice``, the authors' map-unit
  sampler in ``networks/gradicon.py``).
  It represents the map ``phi(x) = x + u(x)``; in the registration methods ``x`` is a FIXED voxel
  and ``phi(x)`` the MOVING voxel it corresponds to, so ``warp(moving, u)`` looks like fixed.
- Positions are voxel indices; ``align_corners=True`` semantics: voxel 0 and voxel n-1 are the
  extreme sample positions, and resizing keeps those corner centres (as ``Grid.with_spacing``).
- ``spacing`` arguments are voxel sizes in mm **in tensor axis order (sD, sH, sW)**, i.e.
  ``Grid.spacing[::-1]`` for an engine grid. None means 1 mm (isotropic voxel units).
- Outside the grid, fields and images are extended by their border values (``padding_mode="border"``).

API (all re-exported here):

- :func:`grid_sample_3d`: ``F.grid_sample`` (align_corners=True) using every CPU thread for one volume.
- :func:`identity_grid` ``(shape) -> (1, 3, D, H, W)`` voxel coordinates of every voxel centre.
- :func:`warp` ``(image, u, mode="bilinear"|"nearest") -> image(x + u(x))``; label maps keep their
  dtype with ``mode="nearest"``.
- :func:`compose` ``(first, second)``: displacement of ``x -> y + second(y)`` with ``y = x + first(x)``.
- :func:`integrate_velocity` ``(v, steps=7)``: scaling and squaring, ``exp(v)`` as a displacement.
- :func:`invert` ``(u, iterations=30, tolerance=0.01, quantile=1.0) -> (inverse, residual)``: numerical
  inverse (Anderson-accelerated fixed-point iteration) and its own residual ``|inverse(x) + u(x + inverse(x))|`` in voxels ``(N, 1, D, H, W)``.
- :func:`resize_field` ``(u, shape)``: resample a displacement to another grid over the same box,
  rescaling the values to the new voxel size.
- :func:`upsample_field` ``(u, factor=2)``: the same for pyramids made by average pooling
  (cell-centred coarse grids, ``align_corners=False``).
- :func:`jacobian_determinant` ``(u, spacing=None) -> (N, 1, D, H, W)`` of ``x + u(x)``.
- :func:`diffusion_penalty` / :func:`diffusion_gradient` ``(u, spacing=None)``: mean squared
  forward differences (mm per mm when ``spacing`` is given) and its closed-form gradient.
- :func:`bending_energy` ``(u, spacing=None)``: mean squared second derivatives (MONAI's stencils).

Why not MONAI's ``Warp`` / ``DVF2DDF`` / ``BendingEnergyLoss`` directly: their channel order and
``align_corners=True`` geometry are the same as here (the tests check that our results equal
theirs), but importing any ``monai`` submodule imports the whole package (about 4 s on the
project's 2-core CPU, including ``transformers``' BERT through ``monai.networks.nets``), which
every registration would pay; ``BendingEnergyLoss`` also has no per-axis spacing. The few lines
below are therefore written by hand and kept equal to MONAI's by tests.
"""

from __future__ import annotations

from dinoreg.core.geometry.fields import (compose, identity_grid, integrate_velocity, invert, resize_field, upsample_field,
                                          warp)
from dinoreg.core.geometry.jacobian import jacobian_determinant
from dinoreg.core.geometry.penalties import bending_energy, diffusion_gradient, diffusion_penalty
from dinoreg.core.geometry.sampling import grid_sample_3d

__all__ = ["grid_sample_3d", "identity_grid", "warp", "compose", "integrate_velocity", "invert", "resize_field", "upsample_field",
           "jacobian_determinant", "diffusion_penalty", "diffusion_gradient", "bending_energy"]
