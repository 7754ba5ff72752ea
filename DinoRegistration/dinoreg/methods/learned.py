"""Learned registration: one method per trained model of the models registry (``models/``).

A learned method runs the usual affine stage (unless turned off), then:

1. **canonical preprocessing** (from the model card): fixed and affinely pre-aligned moving (and
   their masks) are resampled onto a *model grid* covering the fixed image, with the card's
   ``spacing_mm``, the card's axis ``orientation`` (or the fixed image's own directions for
   ``"any"``), and a size rounded up to the network's ``shape_multiple`` (the extra voxels are
   padding outside the image); intensities are normalised as the card says (robust percentiles of
   the foreground to [0, 1]; voxels outside a given mask set to 0);
2. the network predicts a voxel displacement on that grid; with ``symmetric`` (default) the
   prediction is ``0.5 * (net(f, m) - net(m, f))``, so identical inputs give exactly the identity;
3. optional **instance optimisation** (the ``io`` preset): Adam steps refining the predicted field,
   with MIND-SSC similarity (ConvexAdam's Adam stage) or local NCC, plus a diffusion penalty, on a
   grid of ``io_spacing_mm`` (2 mm: a coarse model's field is resampled there first; 0 = model grid);
4. **postprocessing** as for every dense method (``dense_result``): the field is converted to LPS mm
   on the model grid, resampled onto the fixed grid and put before the affine, so the result is
   the usual full-resolution physical transform (ITK export, inverse, Jacobian all work).

Methods are registered from the registry each time the method list is read (:func:`refresh_methods`),
so models saved or downloaded while a process runs appear at once; a model whose files are absent
is listed as unavailable with the command that fixes it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from dinoreg.core.geometry import diffusion_penalty, warp
from dinoreg.core.spatial import (grid_points, physical_displacement_to_voxel, sample_at_points,
                                  voxel_displacement_to_physical)
from dinoreg.core.transforms import Transform, warp_volume
from dinoreg.core.volume import Grid, Volume
from dinoreg.errors import InputError
from dinoreg.core.intensity import robust_normalise
from dinoreg.features.mind import mind_ssc
from dinoreg.losses import local_ncc_loss
from dinoreg.methods.base import (_REGISTRY, Availability, Method, RegistrationProblem, WorkingPair, dense_result,
                                  prepare_working_pair, register_method)
from dinoreg.methods.zeroshot import dino_module_availability, foreground_region, normalise_group
from dinoreg.networks.loading import load_model
from dinoreg.optim.adam import Adam
from dinoreg.optim.convex_adam import ConvexAdamSettings
from dinoreg.optim.convex_adam import instance_optimisation as adam_stage
from dinoreg.store import card_summary, list_models
from dinoreg.store.cards import orientation_matrix

STAGE_RESAMPLE = "resampling"
STAGE_NETWORK = "network"
STAGE_IO = "instance optimisation"
STAGE_OUTPUT = "output field"

LEARNED_DEFAULTS: dict[str, Any] = {
    "symmetric": True,               # average net(f, m) and -net(m, f): identity on identical inputs
    "io_iterations": 0,              # Adam steps of instance optimisation after the network (preset io: 40)
    "io_similarity": "mind",         # "mind" (MIND-SSC, ConvexAdam's Adam stage) or "lncc" (local NCC, MONAI)
    "io_regularisation": 0.5,        # diffusion weight (mind: features at unit total variance; lncc: per voxel^2)
    "io_learning_rate": 1.0,         # Adam step (mind: lattice voxels; lncc: model-grid voxels, scaled by 0.1)
    "io_level": 2,                   # mind: the optimised field lives on every io_level-th io-grid voxel
    "io_spacing_mm": 2.0,            # grid of the instance optimisation (mm): finer than a coarse model's grid
                                     # (a 4 mm model's field is refined at 2 mm); 0 = the model grid
    "io_lncc_window": 5,             # lncc window (model-grid voxels, odd)
    "foreground_margin_mm": 8.0,     # the io data term is evaluated on the fixed foreground dilated by this
}
IO_PRESET: dict[str, Any] = {"io_iterations": 40}
STAGE_WEIGHTS = {STAGE_RESAMPLE: 1.0, STAGE_NETWORK: 2.0, STAGE_IO: 6.0, STAGE_OUTPUT: 1.0}
DEFAULT_RANK = 50  # after the zero-shot methods unless the model card says otherwise ("rank")

_LOADED: "OrderedDict[tuple[str, float, str], tuple[Any, dict[str, Any]]]" = OrderedDict()


class LearnedMethod(Method):
    """Base of the per-model methods created by :func:`refresh_methods` (``model_info`` set there)."""

    kind = "learned"
    model_info: Any = None  # models.registry.ModelInfo
    stage_weights = STAGE_WEIGHTS
    presets = {"default": dict(LEARNED_DEFAULTS), "io": dict(IO_PRESET)}

    # ------------------------------------------------------------------ listing

    def card(self) -> dict[str, Any] | None:
        """The model card if its file is readable (cheap: JSON only)."""
        try:
            return json.loads(self.model_info.card_path.read_text())
        except (OSError, ValueError, AttributeError):
            return None

    def availability(self, params: dict[str, Any] | None = None) -> Availability:
        info = self.model_info
        if not info.present:
            missing = "weights" if info.card_path.is_file() else "files"
            return Availability(False, f"the {missing} of model '{info.name}' are not installed: {info.fix}")
        card = self.card() or {}
        model = dino_model_of(card)
        if model:
            dino = dino_module_availability(model)
            if not dino.ok:
                return Availability(False, f"model '{info.name}' needs DINO weights: {dino.reason}")
        return Availability(True)

    # ------------------------------------------------------------------ run

    def run(self, problem: RegistrationProblem, initial: Transform) -> Transform:
        params = self.parameters(overrides=problem.params)
        progress = problem.progress
        progress.stage(STAGE_RESAMPLE)
        network, card = loaded_model(self.model_info, problem.device)
        with torch.no_grad():
            pair, fixed, moving = model_inputs(problem, initial, card["preprocessing"], int(network.shape_multiple))
            progress.stage(STAGE_NETWORK)
            displacement = predict(network, fixed, moving, bool(params["symmetric"]))
        progress.update(1.0)
        iterations = int(params["io_iterations"])
        if iterations > 0:
            progress.stage(STAGE_IO)
            io_spacing = float(params["io_spacing_mm"])
            if io_spacing < 0:
                raise InputError(f"io_spacing_mm must be >= 0 (got {io_spacing}): e.g. --param io_spacing_mm=2")
            if 0 < io_spacing < float(np.min(pair.grid.spacing)):
                io_pair = prepare_working_pair(problem, initial, io_spacing)
                with torch.no_grad():
                    displacement = field_on_grid(displacement, pair.grid, io_pair.grid)
                pair = io_pair
                fixed = normalise(pair.fixed, pair.fixed_mask, card["preprocessing"])
                moving = normalise(pair.moving, pair.moving_mask, card["preprocessing"])
            displacement = optimise_network_field(fixed, moving, displacement, pair, params, progress)
        progress.stage(STAGE_OUTPUT)

        return dense_result(displacement, pair, problem, initial)


def dino_model_of(card: dict[str, Any]) -> str | None:
    """The DINO backbone a model card needs, or None."""
    features = card.get("features", {}) or {}
    if features.get("kind") == "dino":
        return str(features.get("model") or card.get("config", {}).get("dino_model"))
    return None


def loaded_model(info: Any, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The model's network (eval mode, on ``device``) and card, kept for the next run of this process."""
    key = (str(info.weights_path), info.weights_path.stat().st_mtime, str(device))
    if key not in _LOADED:
        _LOADED[key] = load_model(info.name, device)
        while len(_LOADED) > 2:
            _LOADED.popitem(last=False)
    return _LOADED[key]


# ---------------------------------------------------------------------- preprocessing

def model_inputs(problem: RegistrationProblem, initial: Transform, preprocessing: dict[str, Any],
                 multiple: int) -> tuple[WorkingPair, torch.Tensor, torch.Tensor]:
    """The canonical preprocessing of a model card: the pair (and masks) on the model grid, and the
    normalised fixed and moving images ``(1, 1, D, H, W)`` the network takes."""
    grid = model_grid(problem.fixed.grid, float(preprocessing["spacing_mm"]), str(preprocessing.get("orientation", "any")),
                      multiple)
    pair = resample_pair(problem, initial, grid)
    return pair, normalise(pair.fixed, pair.fixed_mask, preprocessing), normalise(pair.moving, pair.moving_mask, preprocessing)


def model_grid(fixed_grid: Grid, spacing_mm: float, orientation: str, multiple: int) -> Grid:
    """Grid of the network: covers the fixed image's box, ``spacing_mm`` voxels, axes along
    ``orientation`` (an axis code such as 'RAS' for the i, j, k axes, or 'any' = the fixed image's
    directions), each size rounded up to a multiple of ``multiple`` (centred: the padding is split)."""
    direction = fixed_grid.direction if orientation.lower() == "any" else orientation_matrix(orientation)
    size = np.asarray(fixed_grid.size)
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    physical = corners @ fixed_grid.index_to_physical.T
    along_axes = physical[:, :3] @ direction  # coordinates along the new axes (direction is orthonormal)
    low, high = along_axes.min(axis=0), along_axes.max(axis=0)
    count = np.round((high - low) / spacing_mm).astype(int) + 1
    count = (np.ceil(count / multiple) * multiple).astype(int)
    centre = (low + high) / 2.0
    origin = direction @ (centre - spacing_mm * (count - 1) / 2.0)
    return Grid(tuple(int(c) for c in count), origin, np.full(3, float(spacing_mm)), direction)


def resample_pair(problem: RegistrationProblem, initial: Transform, grid: Grid) -> WorkingPair:
    """Fixed (identity) and moving (through ``initial``) with their masks on ``grid``, ``(1, 1, D, H, W)``.

    Images are first smoothed as average pooling to ``grid``'s spacing would (:func:`antialiased`):
    networks are trained on images average-pooled to their spacing, and sampling a 1 mm image at
    4 mm points without it would alias (noise and thin structures picked at random)."""
    def to_tensor(volume: Volume | None, transform: Transform, mode: str) -> torch.Tensor | None:
        if volume is None:
            return None
        source = antialiased(volume, grid.spacing) if mode == "linear" else volume.with_array(volume.array.astype(np.float32))
        resampled = warp_volume(source, transform, grid, mode, problem.device)
        return torch.from_numpy(resampled.array).to(problem.device)[None, None]

    identity = Transform()
    return WorkingPair(grid=grid, fixed=to_tensor(problem.fixed, identity, "linear"),
                       moving=to_tensor(problem.moving, initial, "linear"),
                       fixed_mask=to_tensor(problem.fixed_mask, identity, "nearest"),
                       moving_mask=to_tensor(problem.moving_mask, initial, "nearest"))


def antialiased(volume: Volume, target_spacing_mm: Any) -> Volume:
    """``volume`` (float32) smoothed as average pooling to ``target_spacing_mm`` would: a Gaussian of
    sigma = sqrt((target^2 - source^2) / 12) mm per axis (a box of width w has variance w^2 / 12);
    unchanged when the target is not coarser than the source."""
    import SimpleITK as sitk  # lazy: not needed to start this command

    source = np.asarray(volume.grid.spacing, dtype=np.float64)
    target = np.broadcast_to(np.asarray(target_spacing_mm, dtype=np.float64), source.shape)
    sigma = np.sqrt(np.maximum(target ** 2 - source ** 2, 0.0) / 12.0)
    image = volume.array.astype(np.float32)
    if np.all(sigma < 0.25 * source):
        return volume.with_array(image)
    smoothed = sitk.SmoothingRecursiveGaussian(volume.with_array(image).to_sitk(), [float(x) for x in sigma])
    return volume.with_array(sitk.GetArrayFromImage(smoothed))


def field_on_grid(displacement: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """A voxel displacement ``(1, 3, D, H, W)`` on ``source`` (channel k along axis k + 2) resampled
    (trilinear, in LPS mm) onto ``target`` and expressed in ``target``'s voxels; 0 outside ``source``."""
    physical = voxel_displacement_to_physical(displacement, source)
    sampled = sample_at_points(physical, source, grid_points(target, device=displacement.device))
    return physical_displacement_to_voxel(sampled, target)


def normalise(image: torch.Tensor, mask: torch.Tensor | None, preprocessing: dict[str, Any]) -> torch.Tensor:
    """Intensities as the model was trained: robust foreground percentiles to [0, 1], 0 outside a mask."""
    rule = preprocessing.get("normalisation", {}) or {}
    kind = rule.get("kind", "percentile")
    if kind != "percentile":
        raise InputError(f"the model card asks for normalisation '{kind}', which this dinoreg does not know: update dinoreg")
    result = robust_normalise(image, mask, float(rule.get("low", 0.5)), float(rule.get("high", 99.5)))
    if mask is not None:
        result = result * (mask > 0.5).to(result.dtype)
    return result


def predict(network: Any, fixed: torch.Tensor, moving: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """The network's displacement ``(1, 3, D, H, W)`` (model-grid voxels, channel k along axis k + 2)."""
    if symmetric:
        return network.symmetric_forward(fixed, moving)
    return network(fixed, moving).float()


# ---------------------------------------------------------------------- instance optimisation

def optimise_network_field(fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor, pair: WorkingPair,
                          params: dict[str, Any], progress: Any) -> torch.Tensor:
    """Refine the predicted field with Adam: MIND-SSC (ConvexAdam's Adam stage) or local NCC, + diffusion."""
    similarity = str(params["io_similarity"])
    region = foreground_region(pair.fixed, pair.fixed_mask, pair.grid.spacing, float(params["foreground_margin_mm"]))
    if similarity == "mind":
        with torch.no_grad():
            fixed_mind = mind_ssc(fixed, pair.fixed_mask, 1, 2, pair.grid.spacing)
            moving_mind = mind_ssc(moving, pair.moving_mask, 1, 2, pair.grid.spacing)
            fixed_mind, moving_mind = normalise_group(fixed_mind, moving_mind, region)
        settings = ConvexAdamSettings(adam_level=int(params["io_level"]), adam_iterations=int(params["io_iterations"]),
                                      adam_learning_rate=float(params["io_learning_rate"]),
                                      regularisation=float(params["io_regularisation"]), smoothing_passes=1,
                                      diffeomorphic=False, search_radius=0)
        return adam_stage(fixed_mind, moving_mind, displacement, settings, pair.grid.spacing, region, progress)
    if similarity == "lncc":
        return lncc_optimisation(fixed, moving, displacement, params, progress)
    raise InputError(f"io_similarity must be 'mind' or 'lncc' (got {similarity!r}): e.g. --param io_similarity=mind")


def lncc_optimisation(fixed: torch.Tensor, moving: torch.Tensor, displacement: torch.Tensor, params: dict[str, Any],
                      progress: Any) -> torch.Tensor:
    """Adam on the full model-grid field: local NCC (MONAI) + ``io_regularisation`` * diffusion."""
    iterations = int(params["io_iterations"])
    parameter = displacement.detach().clone().requires_grad_(True)
    optimiser = Adam(parameter, 0.1 * float(params["io_learning_rate"]))
    for iteration in range(iterations):
        optimiser.zero_grad()
        loss = local_ncc_loss(fixed, warp(moving, parameter), int(params["io_lncc_window"])) \
            + float(params["io_regularisation"]) * diffusion_penalty(parameter)
        loss.backward()
        optimiser.step()
        progress.update((iteration + 1) / iterations)
    return parameter.detach()


# ---------------------------------------------------------------------- registration of the methods

def refresh_methods() -> None:
    """(Re-)register one method per model of the registry; forget methods of models that are gone."""
    try:
        infos = list_models()
    except InputError:
        infos = []
    current = set()
    for info in infos:
        existing = _REGISTRY.get(info.name)
        if existing is not None and not issubclass(existing, LearnedMethod):
            continue  # never shadow a built-in method
        current.add(info.name)
        register_method(method_class(info))
    for name, cls in list(_REGISTRY.items()):
        if isinstance(cls, type) and issubclass(cls, LearnedMethod) and name not in current:
            del _REGISTRY[name]


def method_class(info: Any) -> type[LearnedMethod]:
    """A LearnedMethod subclass for one registry model."""
    attributes: dict[str, Any] = {"name": info.name, "model_info": info, "label": f"{info.name} (learned)",
                                  "summary": f"trained {info.architecture} network ({info.source} model)",
                                  "rank": DEFAULT_RANK}
    method = type("LearnedMethod_" + info.name.replace("-", "_"), (LearnedMethod,), attributes)
    card = method().card()
    if card:
        method.summary = f"trained network: {card_summary(card)}"
        method.label = str(card.get("label") or method.label)
        method.rank = int(card.get("rank", DEFAULT_RANK))
    return method

