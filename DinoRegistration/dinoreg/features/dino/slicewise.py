"""Slice-wise volumetric DINO features for a fixed/moving pair (the DINO-Reg recipe).

Pipeline for one pair on one working grid (arrays ``(1, 1, K, J, I)``, grid spacing in mm):

1. normalise intensities to [0, 1] (CT window or percentiles), find the foreground;
2. crop both volumes to the bounding box of their joint foreground (plus a margin);
3. for each slicing axis, resize every slice so one token covers ``token_mm`` x ``token_mm`` mm,
   grey -> RGB with ImageNet statistics, and encode in batches: only non-empty slices, every
   ``slice_stride``-th one (plus the ends of each non-empty run); empty slices get the features of
   one encoded blank slice;
4. fit ONE PCA on the foreground tokens of both images (all axes), project to ``pca_channels``
   at token resolution;
5. fill skipped slices by linear interpolation between the nearest known slices, upsample each
   slice plane bilinearly to the voxel grid, average the axes, pad the crop back (replicate).

Dense full-width features are never formed on the voxel grid: only ``pca_channels`` channels
are ever upsampled (a 768-channel fp16 field on a 160x192x224 grid would take ~10 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinoreg.core.volume import Grid
from dinoreg.errors import InputError
from dinoreg.features.dino.backbones import Backbone, imagenet_normalise, load_backbone
from dinoreg.features.dino.intensity import foreground, normalise_intensity
from dinoreg.features.dino.pca import JointPCA
from dinoreg.progress import Progress
from dinoreg.features.dino.params import DEFAULT_PARAMS

#: concrete values for the 0 (auto) defaults, per device type. CPU: a 160x192x224 brain pair with
#: ViT-S/14 is 96 slices of 32x27 tokens (~5 TFLOP, well under a minute on 2 idle cores); GPU:
#: ~190 slices of 73x64 tokens (~110 TFLOP, under a second of H100 bf16 time, ~2 GB).
AUTO_PARAMS: dict[str, dict[str, Any]] = {
    "cuda": {"token_mm": 2.5, "slice_stride": 2, "batch_size": 32},
    "cpu": {"token_mm": 6.0, "slice_stride": 4, "batch_size": 8},
}
AXIS_NAMES = ("axial", "coronal", "sagittal", "all")
MIN_FOREGROUND_FRACTION = 0.002  # a slice with less foreground than this is empty
TOKEN_FOREGROUND_FRACTION = 0.5  # a token is foreground when half its area is
MAX_TOKENS_PER_SLICE = 16384  # token_mm is raised for an axis whose slices would need more
CROP_MARGIN_TOKENS = 2
STORE_DTYPE = torch.float16  # raw tokens are kept in half precision until projected


@dataclass(frozen=True)
class DinoSettings:
    """Concrete feature-extraction settings (after resolving the automatic defaults)."""

    model: str
    slice_axes: str
    token_mm: float
    slice_stride: int
    pca_channels: int
    batch_size: int
    precision: str  # fp32 | fp16 | bf16
    ct_window: tuple[float, float] | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)


def effective_settings(params: dict[str, Any], device: torch.device | str) -> DinoSettings:
    """Merge ``params`` over :data:`DEFAULT_PARAMS` and resolve 'auto' values for ``device``."""
    device = torch.device(device)
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    auto = AUTO_PARAMS["cuda" if device.type == "cuda" else "cpu"]
    token_mm = float(merged["token_mm"]) if float(merged["token_mm"]) > 0 else auto["token_mm"]
    stride = int(merged["slice_stride"]) if int(merged["slice_stride"]) > 0 else auto["slice_stride"]
    batch = int(merged["batch_size"]) if int(merged["batch_size"]) > 0 else auto["batch_size"]
    axes = str(merged["slice_axes"]).lower()
    if axes not in AXIS_NAMES:
        raise InputError(f"slice_axes must be one of {', '.join(AXIS_NAMES)}, not '{merged['slice_axes']}'")
    channels = int(merged["pca_channels"])
    if channels < 1:
        raise InputError(f"pca_channels must be at least 1, not {channels}")
    precision = str(merged["precision"]).lower()
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "fp32" if device.type != "cuda" else ("bf16" if bf16 else "fp16")
    if precision not in ("fp32", "fp16", "bf16"):
        raise InputError(f"precision must be auto, fp32, fp16 or bf16, not '{merged['precision']}'")
    return DinoSettings(model=str(merged["model"]), slice_axes=axes, token_mm=token_mm, slice_stride=stride,
                        pca_channels=channels, batch_size=batch, precision=precision,
                        ct_window=parse_ct_window(merged.get("ct_window")))


def parse_ct_window(value: Any) -> tuple[float, float] | None:
    """``"low,high"`` HU (or a pair) -> ``(low, high)``; None/"" = the default window. One-line errors."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise InputError(f"ct_window={value!r} is not 'low,high' in HU: e.g. ct_window=-150,250 (soft tissue)") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"ct_window={value!r} needs finite low < high (HU): e.g. ct_window=-150,250")
    return low, high


# ----------------------------------------------------------------------------------------------
# geometry of slicing


def array_spacing(grid: Grid) -> tuple[float, float, float]:
    """Spacing in mm along the array axes (k, j, i)."""
    return float(grid.spacing[2]), float(grid.spacing[1]), float(grid.spacing[0])


def slicing_axes(grid: Grid, which: str) -> list[int]:
    """Array axes (0 = k, 1 = j, 2 = i) to slice along.

    'axial' slices along the grid axis closest to the patient's S-I direction (LPS z),
    'coronal' along A-P (y), 'sagittal' along L-R (x); 'all' uses the three array axes.
    """
    if which == "all":
        return [0, 1, 2]
    physical = {"sagittal": 0, "coronal": 1, "axial": 2}[which]
    index_axis = int(np.argmax(np.abs(grid.direction[physical, :])))  # 0 = i, 1 = j, 2 = k
    return [2 - index_axis]


@dataclass(frozen=True)
class AxisPlan:
    """How slices along one array axis are encoded: plane size in voxels and in tokens."""

    axis: int
    plane: tuple[int, int]  # (A, B) voxels of one slice
    tokens: tuple[int, int]  # (h, w) token grid of one slice
    patch: int

    @property
    def pixels(self) -> tuple[int, int]:
        return self.tokens[0] * self.patch, self.tokens[1] * self.patch


def plan_axis(axis: int, shape: tuple[int, int, int], spacing: tuple[float, float, float], token_mm: float,
              patch: int) -> AxisPlan:
    """Token grid so that one token covers about ``token_mm`` mm of the slice (full field of view)."""
    dims = [d for d in range(3) if d != axis]
    extent = [shape[d] * spacing[d] for d in dims]
    tokens = [max(1, round(e / token_mm)) for e in extent]
    if tokens[0] * tokens[1] > MAX_TOKENS_PER_SLICE:
        factor = math.sqrt(tokens[0] * tokens[1] / MAX_TOKENS_PER_SLICE)
        tokens = [max(1, int(t / factor)) for t in tokens]
    return AxisPlan(axis=axis, plane=(shape[dims[0]], shape[dims[1]]), tokens=(tokens[0], tokens[1]), patch=patch)


def foreground_box(masks: list[torch.Tensor], margins: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """Bounding box (array slices) of the union of boolean volumes, grown by ``margins`` voxels."""
    union = masks[0].clone()
    for mask in masks[1:]:
        union |= mask
    if not bool(union.any()):
        return tuple(slice(0, n) for n in union.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(d for d in range(3) if d != axis)
        present = torch.nonzero(union.any(dim=other[1]).any(dim=other[0])).flatten()
        low = max(0, int(present[0]) - margins[axis])
        high = min(union.shape[axis], int(present[-1]) + 1 + margins[axis])
        box.append(slice(low, high))
    return tuple(box)  # type: ignore[return-value]


@dataclass(frozen=True)
class SliceSchedule:
    """Which slices along an axis are encoded, which are empty; the rest are interpolated."""

    encoded: np.ndarray  # sorted slice indices run through the network
    empty: np.ndarray  # sorted indices of background-only slices (blank features)
    count: int  # number of slices along the axis


def schedule_slices(foreground_counts: np.ndarray, plane_voxels: int, stride: int) -> SliceSchedule:
    """Encode every ``stride``-th non-empty slice plus the first and last of each non-empty run."""
    count = len(foreground_counts)
    nonempty = foreground_counts >= max(1.0, MIN_FOREGROUND_FRACTION * plane_voxels)
    if not nonempty.any():
        return SliceSchedule(np.zeros(0, dtype=int), np.arange(count), count)
    index = np.arange(count)
    first = int(index[nonempty][0])
    previous = np.concatenate([[False], nonempty[:-1]])
    following = np.concatenate([nonempty[1:], [False]])
    run_end = nonempty & (~previous | ~following)
    on_stride = nonempty & ((index - first) % max(1, stride) == 0)
    return SliceSchedule(index[on_stride | run_end], index[~nonempty], count)


def interpolation_table(schedule: SliceSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every slice: (lower, upper) positions in the known-slice list and the weight of upper.

    Known slices are the encoded ones (positions 0..E-1) and the empty ones (position E, the
    blank slice). A slice between two known slices a < s < b gets (1 - w) f(a) + w f(b) with
    w = (s - a) / (b - a); outside the first/last known slice the nearest one is used.
    """
    count = schedule.count
    known_index = np.full(count, -1)
    known_index[schedule.encoded] = np.arange(len(schedule.encoded))
    known_index[schedule.empty] = len(schedule.encoded)
    known_slices = np.flatnonzero(known_index >= 0)
    position = np.arange(count)
    upper_at = np.clip(np.searchsorted(known_slices, position), 0, len(known_slices) - 1)
    lower_at = np.clip(np.searchsorted(known_slices, position, side="right") - 1, 0, len(known_slices) - 1)
    lower, upper = known_slices[lower_at], known_slices[upper_at]
    gap = np.maximum(upper - lower, 1)
    weight = np.where(upper > lower, (position - lower) / gap, 0.0)
    return known_index[lower], known_index[upper], weight.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# encoding


def resize_slices(slices: torch.Tensor, pixels: tuple[int, int]) -> torch.Tensor:
    """``(n, A, B)`` -> ``(n, 1, H, W)`` bilinear (anti-aliased when shrinking), pixel centres kept."""
    images = slices.unsqueeze(1).float()
    if tuple(images.shape[-2:]) == tuple(pixels):
        return images
    shrinking = pixels[0] < images.shape[-2] or pixels[1] < images.shape[-1]
    return F.interpolate(images, size=pixels, mode="bilinear", align_corners=False, antialias=shrinking)


def token_foreground(masks: torch.Tensor, tokens: tuple[int, int]) -> torch.Tensor:
    """``(n, A, B)`` boolean -> ``(n, h*w)`` boolean: tokens at least half covered by foreground."""
    fraction = F.adaptive_avg_pool2d(masks.unsqueeze(1).float(), tokens)
    return (fraction >= TOKEN_FOREGROUND_FRACTION).flatten(1)


class _Counter:
    """Progress over all encoded slices of the pair."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, max(total, 1), 0

    def advance(self, count: int) -> None:
        self.done += count
        self.progress.update(0.95 * self.done / self.total)


def encode_slices(backbone: Backbone, volume: torch.Tensor, indices: np.ndarray, plan: AxisPlan,
                  settings: DinoSettings, counter: _Counter | None = None) -> torch.Tensor:
    """Encode slices ``indices`` of ``volume`` (normalised, axis already moved first) -> ``(n, h*w, C)``."""
    chunks = []
    for start in range(0, len(indices), settings.batch_size):
        batch = torch.as_tensor(indices[start:start + settings.batch_size], device=volume.device)
        pixels = imagenet_normalise(resize_slices(volume.index_select(0, batch), plan.pixels))
        chunks.append(backbone.encode(pixels, settings.autocast_dtype).to(STORE_DTYPE))
        if counter is not None:
            counter.advance(len(batch))
    if not chunks:
        return torch.zeros(0, plan.tokens[0] * plan.tokens[1], backbone.hidden_size, dtype=STORE_DTYPE,
                           device=volume.device)
    return torch.cat(chunks)


@dataclass
class _Encoded:
    """Raw tokens of one image along one axis, before the PCA."""

    plan: AxisPlan
    schedule: SliceSchedule
    tokens: torch.Tensor  # (E, h*w, C) half precision
    blank: torch.Tensor  # (1, h*w, C)


def assemble_axis(encoded: _Encoded, pca: JointPCA, out: torch.Tensor) -> None:
    """Project, interpolate skipped slices, upsample each plane to voxels and add into ``out``.

    ``out`` is ``(P, K, J, I)`` (cropped); only P-channel tensors are ever upsampled.
    """
    plan = encoded.plan
    h, w = plan.tokens
    known = torch.cat([encoded.tokens, encoded.blank])  # (E + 1, h*w, C)
    features = torch.cat([pca.project(chunk) for chunk in known.split(64)])  # (E + 1, h*w, P)
    features = features.transpose(1, 2).reshape(len(known), -1, h, w)
    lower, upper, weight = interpolation_table(encoded.schedule)
    target = out.movedim(plan.axis + 1, 1)  # (P, S, A, B) view
    device = out.device
    for start in range(0, encoded.schedule.count, 16):
        stop = min(start + 16, encoded.schedule.count)
        lo = torch.as_tensor(lower[start:stop], device=device)
        hi = torch.as_tensor(upper[start:stop], device=device)
        wt = torch.as_tensor(weight[start:stop], device=device).view(-1, 1, 1, 1)
        tokens = features.index_select(0, lo) * (1 - wt) + features.index_select(0, hi) * wt  # (n, P, h, w)
        planes = F.interpolate(tokens, size=plan.plane, mode="bilinear", align_corners=False)  # (n, P, A, B)
        target[:, start:stop] += planes.transpose(0, 1)


# ----------------------------------------------------------------------------------------------
# the pair


@torch.no_grad()
def dino_feature_pair(fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, fixed_mask: torch.Tensor | None,
                      moving_mask: torch.Tensor | None, params: dict[str, Any], device: torch.device | str,
                      progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO features of a fixed/moving pair on their common working grid.

    ``fixed``, ``moving``: ``(1, 1, K, J, I)`` raw intensities on ``grid`` (spacing in mm, LPS);
    masks ``(1, 1, K, J, I)`` in {0, 1} or None. Returns two ``(1, P, K, J, I)`` float32 tensors on
    ``device`` with P = ``pca_channels``, in one shared PCA basis (centred, scaled so a
    foreground voxel has unit expected squared norm). Parameters: see :data:`DEFAULT_PARAMS`.
    """
    device = torch.device(device)
    progress = progress or Progress()
    settings = effective_settings(params, device)
    backbone = load_backbone(settings.model, device)
    if settings.pca_channels > backbone.hidden_size:
        raise InputError(f"pca_channels={settings.pca_channels} exceeds the width {backbone.hidden_size} of {settings.model}")
    progress.stage("dino features")
    pair = [(fixed, fixed_mask), (moving, moving_mask)]
    volumes, foregrounds, box = prepare_pair(pair, grid, settings, device)
    crop_shape = tuple(volumes[0].shape)
    plans = [plan_axis(axis, crop_shape, array_spacing(grid), settings.token_mm, backbone.patch_size)
             for axis in slicing_axes(grid, settings.slice_axes)]
    encoded, pca = encode_pair(backbone, volumes, foregrounds, plans, settings, progress)
    outputs = [assemble_image(items, pca, grid.shape, box) for items in encoded]
    progress.update(1.0)
    return outputs[0], outputs[1]


def prepare_pair(pair: list[tuple[torch.Tensor, torch.Tensor | None]], grid: Grid, settings: DinoSettings,
                 device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[slice, slice, slice]]:
    """Normalised volumes and foregrounds ``(k, j, i)``, cropped to their joint foreground box."""
    volumes, foregrounds = [], []
    # one normalisation rule for both images: masks only when both have one (see zeroshot.both_masked)
    both_masked = all(mask is not None for _, mask in pair)
    for image, mask in pair:
        for tensor in (image, mask) if mask is not None else (image,):
            if tuple(tensor.shape[-3:]) != grid.shape or tensor.numel() != math.prod(grid.shape):
                raise InputError(f"DINO features: a volume of shape {tuple(tensor.shape)} is not on the working grid "
                                 f"{grid.shape} (k, j, i)")
        image = image.to(device).reshape(image.shape[-3:])
        mask = mask.to(device).reshape(mask.shape[-3:]) if mask is not None else None
        normalised = normalise_intensity(image, mask if both_masked else None, settings.ct_window)
        volumes.append(normalised)
        foregrounds.append(foreground(normalised, mask))
    margins = tuple(int(math.ceil(CROP_MARGIN_TOKENS * settings.token_mm / s)) for s in array_spacing(grid))
    box = foreground_box(foregrounds, margins)  # type: ignore[arg-type]
    return [v[box] for v in volumes], [f[box] for f in foregrounds], box


def encode_pair(backbone: Backbone, volumes: list[torch.Tensor], foregrounds: list[torch.Tensor],
                plans: list[AxisPlan], settings: DinoSettings,
                progress: Progress) -> tuple[list[list[_Encoded]], JointPCA]:
    """Encode the scheduled slices of both images along every axis; fit the joint PCA on their
    foreground tokens. Returns the raw tokens per image (one item per axis) and the fitted PCA."""
    device = volumes[0].device
    schedules = [[schedule_slices(fg.movedim(plan.axis, 0).flatten(1).sum(1).cpu().numpy(),
                                  plan.plane[0] * plan.plane[1], settings.slice_stride) for fg in foregrounds]
                 for plan in plans]
    counter = _Counter(progress, sum(len(s.encoded) for row in schedules for s in row) + len(plans))
    pca = JointPCA(backbone.hidden_size, device)
    encoded: list[list[_Encoded]] = [[] for _ in volumes]
    for plan, row in zip(plans, schedules):
        blank = encode_slices(backbone, torch.zeros((1, *plan.plane), device=device), np.zeros(1, dtype=int), plan,
                              settings, counter)
        for i, schedule in enumerate(row):
            tokens = encode_slices(backbone, volumes[i].movedim(plan.axis, 0), schedule.encoded, plan, settings, counter)
            fg_tokens = token_foreground(foregrounds[i].movedim(plan.axis, 0)[schedule.encoded], plan.tokens)
            pca.add(tokens[fg_tokens])
            encoded[i].append(_Encoded(plan, schedule, tokens, blank))
    if pca.count <= settings.pca_channels:  # (almost) no foreground: fit on everything encoded
        for item in (item for items in encoded for item in items):
            pca.add(torch.cat([item.tokens, item.blank]).flatten(0, 1))
    pca.fit(settings.pca_channels)
    return encoded, pca


def assemble_image(items: list[_Encoded], pca: JointPCA, shape: tuple[int, int, int],
                   box: tuple[slice, slice, slice]) -> torch.Tensor:
    """``(1, P, K, J, I)`` features of one image: axes averaged in the crop, replicated outside."""
    device = pca.sum.device
    full = torch.zeros((1, pca.basis.shape[1], *shape), dtype=torch.float32, device=device)
    out = full[0][(slice(None), *box)]  # (P, k, j, i) view of the crop
    for item in items:
        assemble_axis(item, pca, out)
        item.tokens = item.tokens[:0]  # free the raw tokens as soon as they are projected
    if len(items) > 1:
        out /= len(items)
    replicate_outside(full[0], box)
    return full


def replicate_outside(volume: torch.Tensor, box: tuple[slice, slice, slice]) -> None:
    """Fill ``volume (P, K, J, I)`` outside ``box`` with the nearest value inside it, in place.

    Axis by axis over the full extent of the others, which equals clamping every index into the
    box (replicate padding) without allocating a second full-size tensor.
    """
    for axis, extent in enumerate(box):
        view = volume.movedim(axis + 1, 0)
        if extent.start > 0:
            view[: extent.start] = view[extent.start: extent.start + 1]
        if extent.stop < view.shape[0]:
            view[extent.stop:] = view[extent.stop - 1: extent.stop]
