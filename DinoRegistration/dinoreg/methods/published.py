"""Published registration networks run as their authors run them: uniGradICON and multiGradICON
(below), and TransMorph / ViT-V-Net (:class:`AtlasSpaceMethod`, at the end).

The processing reproduces the reference (``unigradicon-register``, i.e. ``unigradicon.preprocess``
and ``icon_registration.itk_wrapper.register_pair``; checked against it in ``Testing/test_gradicon.py``):

1. intensities per modality: CT clipped to [-1000, 1000] HU, MRI clipped to [image minimum, 99th
   percentile], both scaled to [0, 1]; voxels outside a given mask set to 0 (their segmentation
   masking);
2. each image resampled WHOLE on its own voxel grid to 175^3 (trilinear, ``align_corners=False``:
   network voxel ``n`` sits at continuous index ``(n + 0.5) * size / 175 - 0.5`` of the image);
3. the network maps fixed network voxels to moving network voxels (``n -> n + u(n)``);
4. the ITK transform of the reference (network grid of the fixed image -> displacement -> network
   grid of the moving image) is our chain ``[DenseField on the fixed image's network grid,
   AffineMap (moving network grid o fixed network grid^-1)]``. Our fields, like ITK's, replicate
   their edge up to half a voxel outside, where the fixed image's edge voxels lie.

No affine stage by default (the reference has none); with ``affine=true`` the moving image is first
resampled through our affine onto the fixed grid and the chain ends with that affine.
``io`` preset: the reference's instance optimisation (50 Adam steps, learning rate 2e-5, on the
network's weights, with its own loss); see :func:`finetune_network_io`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.errors import InputError
from dinoreg.core.affine_map import AffineMap
from dinoreg.core.transforms import DenseField, Transform, warp_volume
from dinoreg.core.volume import Grid
from dinoreg.methods.base import Availability, Method, RegistrationProblem, register_method
from dinoreg.networks import gradicon
from dinoreg.store.cards import published_summary
from dinoreg.networks.loading import load_published
from dinoreg.store import find_model
from dinoreg.store import published

STAGE_PREPARE = "preprocessing"
STAGE_NETWORK = "network"
STAGE_IO = "instance optimisation"
STAGE_OUTPUT = "output field"
CT_WINDOW = (-1000.0, 1000.0)
MRI_QUANTILE = 0.99
AUTO_CT_BELOW = -500.0  # "auto" modality: an image with values below this is a CT in HU (air), else MRI

DEFAULTS: dict[str, Any] = {
    "fixed_modality": "auto",   # ct | mri | auto (ct when the image has values below -500, else mri)
    "moving_modality": "auto",
    "io_iterations": 0,          # preset io: 50 (the reference's default)
    "io_learning_rate": 2e-5,    # the reference's Adam step on the network weights
    "io_lncc_sigma": 5.0,        # the reference's LNCC Gaussian sigma (network voxels)
    "io_lambda": 1.5,            # the reference's GradICON weight
    "io_seed": 0,                # the GradICON loss samples random points: fixed seed, repeatable runs
}

_CACHE: dict[tuple[str, str, float], Any] = {}


def network_grid(grid: Grid, shape: tuple[int, int, int]) -> Grid:
    """The physical grid of an image's network-resampled array: ``shape`` is (D, H, W) = (k, j, i) sizes.

    Voxel ``n`` along an axis of ``size`` voxels is at continuous index ``(n + 0.5) * size / N - 0.5``
    (``F.interpolate(..., align_corners=False)``): same box, spacing ``spacing * size / N``.
    """
    count = np.array(shape[::-1], dtype=np.float64)  # (i, j, k)
    size = np.asarray(grid.size, dtype=np.float64)
    spacing = grid.spacing * size / count
    first = 0.5 * size / count - 0.5
    origin = grid.origin + grid.direction @ (grid.spacing * first)
    return Grid(tuple(int(c) for c in count), origin, spacing, grid.direction)


def detect_modality(array: np.ndarray, choice: str) -> str:
    choice = choice.lower()
    if choice == "auto":
        return "ct" if float(array.min()) < AUTO_CT_BELOW else "mri"
    if choice not in ("ct", "mri"):
        raise InputError(f"modality must be ct, mri or auto (got {choice!r}): e.g. --param fixed_modality=mri")
    return choice


def normalise_intensities(array: np.ndarray, modality: str, mask: np.ndarray | None = None) -> torch.Tensor:
    """The reference's ``preprocess``: clip (CT window or MRI min..99th percentile), scale to [0, 1]; float32."""
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if modality == "ct":
        low, high = CT_WINDOW
    else:
        low = float(image.min())
        flat = image.flatten()
        high = float(torch.kthvalue(flat, int(MRI_QUANTILE * flat.numel())).values)
    if high <= low:
        raise InputError(f"the image is constant after {modality.upper()} normalisation (clipped to [{low:g}, "
                         f"{high:g}]): check the image or the modality parameter (e.g. --param fixed_modality=ct)")
    clipped = image.clamp(low, high).double()
    result = ((clipped - low) * (1.0 / (high - low))).float()
    if mask is not None:
        result = result * torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))
    if float(result.max()) == float(result.min()):  # the reference refuses it too (an assertion)
        raise InputError(f"the image is constant after {modality.upper()} normalisation (clipped to [{low:g}, "
                         f"{high:g}]{' and masked' if mask is not None else ''}): check the image, the mask or "
                         "the modality parameter (e.g. --param fixed_modality=mri)")
    return result


def to_network(image: torch.Tensor, shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """``(K, J, I)`` image -> ``(1, 1, *shape)`` on the network grid (trilinear, align_corners=False)."""
    return F.interpolate(image.to(device)[None, None], size=shape, mode="trilinear", align_corners=False)


def field_transform(displacement: torch.Tensor, fixed_grid: Grid, moving_grid: Grid) -> list:
    """Steps ``[DenseField, AffineMap]`` of the reference's ITK transform, from the network displacement
    ``(1, 3, D, H, W)`` (network voxels, channel c along tensor axis c + 2)."""
    shape = tuple(displacement.shape[2:])
    fixed_net, moving_net = network_grid(fixed_grid, shape), network_grid(moving_grid, shape)
    dense = DenseField.from_voxel_displacement(displacement, fixed_net)
    between = moving_net.index_to_physical @ fixed_net.physical_to_index
    steps: list = [dense]
    if not np.allclose(between, np.eye(4), atol=1e-9):
        steps.append(AffineMap.from_homogeneous(between))
    return steps


class PublishedMethod(Method):
    """One published network (``model`` set per subclass): see the module docstring."""

    kind = "learned"
    model = ""
    uses_affine_stage = False
    stage_weights = {STAGE_PREPARE: 1.0, STAGE_NETWORK: 4.0, STAGE_IO: 20.0, STAGE_OUTPUT: 1.0}
    presets = {"default": dict(DEFAULTS), "io": {"io_iterations": 50}}

    @property
    def model_info(self) -> Any:
        return find_model(self.model)

    def card(self) -> dict[str, Any]:
        return published.published_card(self.model)

    def availability(self, params: dict[str, Any] | None = None) -> Availability:
        if published.weights_path(self.model).is_file():
            return Availability(True)
        card = self.card()
        weights = card["weights"]
        return Availability(False, f"the weights of {self.model} are not downloaded: run 'dinoreg models download "
                                   f"{self.model}' (about {weights['approximate_bytes'] / 1e6:.0f} MB from the "
                                   f"authors, {weights['url']}; weights licence: {weights['licence']})")

    def network(self, device: torch.device) -> Any:
        path = published.weights_path(self.model)
        key = (self.model, str(device), path.stat().st_mtime if path.is_file() else 0.0)
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = load_published(self.model, device)
        return _CACHE[key]

    def run(self, problem: RegistrationProblem, initial: Transform) -> Transform:
        params = self.parameters(overrides=problem.params)
        progress = problem.progress
        progress.stage(STAGE_PREPARE)
        network = self.network(problem.device)
        fixed_net, moving_net, moving_grid = self.network_inputs(problem, initial, params)
        iterations = int(params["io_iterations"])
        if iterations > 0:
            progress.stage(STAGE_IO)
            displacement = finetune_network_io(network, moving_net, fixed_net, params, progress)
        else:
            progress.stage(STAGE_NETWORK)
            with torch.no_grad():
                displacement = network(moving_net, fixed_net)
        progress.stage(STAGE_OUTPUT)
        return Transform(field_transform(displacement, problem.fixed.grid, moving_grid) + list(initial.steps))

    def network_inputs(self, problem: RegistrationProblem, initial: Transform,
                       params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        """Fixed and moving as the network takes them, and the grid the moving array lives on."""
        moving, moving_mask = problem.moving, problem.moving_mask
        if initial.steps:  # our affine stage ran: moving (and its mask) resampled onto the fixed grid first
            grid = problem.fixed.grid
            moving = warp_volume(moving.with_array(moving.array.astype(np.float32)), initial, grid, "linear",
                                 problem.device, default_value=float(moving.array.min()))
            if moving_mask is not None:
                moving_mask = warp_volume(moving_mask, initial, grid, "nearest", problem.device)
        fixed_mod = detect_modality(problem.fixed.array, str(params["fixed_modality"]))
        moving_mod = detect_modality(moving.array, str(params["moving_modality"]))
        fixed = normalise_intensities(problem.fixed.array, fixed_mod,
                                      None if problem.fixed_mask is None else problem.fixed_mask.array)
        moving_t = normalise_intensities(moving.array, moving_mod, None if moving_mask is None else moving_mask.array)
        shape = gradicon.INPUT_SHAPE  # read at call time (tests run the network at a smaller size)
        return to_network(fixed, shape, problem.device), to_network(moving_t, shape, problem.device), moving.grid


def finetune_network_io(network: Any, moving: torch.Tensor, fixed: torch.Tensor, params: dict[str, Any],
                          progress: Any) -> torch.Tensor:
    """The reference's IO (``itk_wrapper.register_pair(finetune_steps=...)``): Adam on a copy of the
    network's weights with the training loss (:func:`gradicon_loss`), then the tuned network's field.
    Batch norm stays in evaluation mode, as in the reference."""

    iterations = int(params["io_iterations"])
    tuned = copy.deepcopy(network)
    optimiser = torch.optim.Adam(tuned.parameters(), lr=float(params["io_learning_rate"]))
    generator = torch.Generator().manual_seed(int(params["io_seed"]))
    with torch.enable_grad():
        for iteration in range(iterations):
            optimiser.zero_grad()
            gradicon.gradicon_loss(tuned, moving, fixed, float(params["io_lambda"]), float(params["io_lncc_sigma"]),
                          generator).backward()
            optimiser.step()
            progress.update((iteration + 1) / iterations)
    with torch.no_grad():
        return tuned(moving, fixed)


def normalise_minmax(array: np.ndarray, mask: np.ndarray | None = None) -> torch.Tensor:
    """An image scaled to [0, 1] by its minimum and maximum (float32), voxels outside ``mask`` set to 0:
    the intensity range of the TransMorph authors' training data."""
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    low, high = float(image.min()), float(image.max())
    if high <= low:
        raise InputError(f"the image is constant ({low:g}): TransMorph needs an image with contrast; check the input")
    result = ((image.double() - low) * (1.0 / (high - low))).float()
    if mask is not None:
        result = result * torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))
    return result


class AtlasSpaceMethod(PublishedMethod):
    """TransMorph (Chen et al. 2022; ``networks/transmorph.py``) and ViT-V-Net (``networks/vitvnet_original.py``)
    with the authors' checkpoints (OASIS, IXI).

    The authors' pipelines, as far as they are theirs to reproduce: both images are already in
    the training data's space (skull-stripped T1, affinely aligned, 1 mm, 160 x 192 x 224 voxels,
    in that data's axis order; for IXI the moving image is their atlas) and scaled to [0, 1]. Here:

    1. each image min-max scaled to [0, 1] (voxels outside a given mask set to 0);
    2. each image resampled WHOLE on its own voxel grid to the card's ``img_size`` (trilinear,
       ``align_corners=False``; the identity for images already of that size);
    3. the network maps fixed network voxels ``p`` to moving network voxels ``p + u(p)``;
    4. the field becomes our chain ``[DenseField, AffineMap]`` exactly as for uniGradICON
       (:func:`field_transform`).

    Nothing reorients, skull-strips or affinely aligns to the atlas: images outside the training
    space give fields nobody has validated (the card says so). No instance optimisation.
    """

    stage_weights = {STAGE_PREPARE: 1.0, STAGE_NETWORK: 4.0, STAGE_OUTPUT: 1.0}
    presets = {"default": {}}

    def run(self, problem: RegistrationProblem, initial: Transform) -> Transform:
        self.parameters(overrides=problem.params)  # rejects unknown parameters
        progress = problem.progress
        progress.stage(STAGE_PREPARE)
        network = self.network(problem.device)
        fixed_net, moving_net, moving_grid = self.network_inputs(problem, initial, {})
        progress.stage(STAGE_NETWORK)
        with torch.no_grad():
            displacement = network(moving_net, fixed_net)
        progress.stage(STAGE_OUTPUT)
        return Transform(field_transform(displacement, problem.fixed.grid, moving_grid) + list(initial.steps))

    def network_inputs(self, problem: RegistrationProblem, initial: Transform,
                       params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        moving, moving_mask = problem.moving, problem.moving_mask
        if initial.steps:  # our affine stage ran (affine=true): moving resampled onto the fixed grid first
            grid = problem.fixed.grid
            moving = warp_volume(moving.with_array(moving.array.astype(np.float32)), initial, grid, "linear",
                                 problem.device, default_value=float(moving.array.min()))
            if moving_mask is not None:
                moving_mask = warp_volume(moving_mask, initial, grid, "nearest", problem.device)
        fixed = normalise_minmax(problem.fixed.array, None if problem.fixed_mask is None else problem.fixed_mask.array)
        moving_t = normalise_minmax(moving.array, None if moving_mask is None else moving_mask.array)
        shape = tuple(int(n) for n in self.card()["config"]["img_size"])
        return to_network(fixed, shape, problem.device), to_network(moving_t, shape, problem.device), moving.grid


METHOD_CLASSES: dict[str, type[PublishedMethod]] = {"gradicon": PublishedMethod, "transmorph": AtlasSpaceMethod,
                                                     "vitvnet-original": AtlasSpaceMethod}


def published_method(name: str, label: str, summary: str, architecture: str = "gradicon",
                     rank: int = 45) -> type[PublishedMethod]:
    return register_method(type(f"Published_{name}", (METHOD_CLASSES[architecture],),
                                {"name": name, "model": name, "label": label, "summary": summary, "rank": rank}))


def register_published() -> None:
    """One method per shipped card of ``models/published`` (label, summary, class and rank from the card)."""
    for name, card in published.published_cards().items():
        published_method(name, str(card.get("label", name)), published_summary(card), str(card["architecture"]),
                         int(card.get("rank", 45)))


register_published()
