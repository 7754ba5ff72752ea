"""TransMorph (Chen et al., Medical Image Analysis 2022): a 3-D Swin transformer encoder, a
convolutional decoder and a displacement head, written here so that the authors' published
checkpoints (``*.pth.tar``: a dict whose ``'state_dict'`` is the network's state dict) load with
``strict=True``: module names, parameter and buffer shapes are the authors'.

Why our own module: the authors publish source only (no package; it needs ``timm`` and
``ml_collections``), and MONAI's ``SwinTransformer`` (``monai.networks.nets.swin_unetr``) is a
different layout: stages named ``layers1..layers4``, MLPs named ``linear1/linear2``, a different
patch-merging order and parameter-free output norms, so the authors' keys cannot be mapped onto it
one to one. The authors' code is the test oracle (``benchmarks/transmorph_reference.py`` runs it
from the fetched repository and ``Testing/test_transmorph.py`` compares the fields).

Architecture (``config`` keys are the authors' ``configs_TransMorph.py`` names):

- ``transformer``: patch embedding (``patch_size``^3 stride convolution, then LayerNorm), four
  stages of Swin blocks (window attention with a learned relative position bias, every second
  block on windows shifted by half a window with the authors' -100 attention mask), each stage
  but the last followed by patch merging (the 8 voxels of each 2x2x2 cell concatenated, LayerNorm,
  linear ``8C -> 8C / pat_merg_rf``), and a LayerNorm on each stage's output (``norm0..norm3``).
  Inputs not divisible by the window are zero-padded at the end (after the norm), as the authors do.
- decoder ``up0..up3`` (and ``up4`` in the full-resolution variant): trilinear x2 upsampling
  (``align_corners=False``), concatenation with the skip, two (3x3x3 convolution without bias,
  InstanceNorm, LeakyReLU 0.01); skips are the transformer stages and ``c1`` (a convolution on the
  pair average-pooled by 2) / ``c2`` (on the pair itself).
- ``reg_head``: a 3x3x3 convolution to 3 channels: the displacement in voxels.
- ``variant``: ``"half"`` (the authors' OASIS / Learn2Reg code: the field is computed at half
  resolution and trilinearly upsampled x2, ``c2`` exists but is unused) or ``"full"`` (their IXI
  code: a fifth decoder block ``up4`` with the ``c2`` skip, field at full resolution).
- ``spatial_trans.grid``: the voxel index grid ``(1, 3, *img_size)`` the authors keep as a buffer
  (it is in their checkpoints, so it is here too; we only use it to warp).

Convention: ``forward(moving, fixed)`` (each ``(N, 1, D, H, W)``, the authors' input is the channel
concatenation ``[moving, fixed]``) returns the displacement ``u`` ``(N, 3, D, H, W)`` in voxels,
channel ``c`` along tensor axis ``c + 2``: fixed voxel ``p`` corresponds to moving voxel ``p + u(p)``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the authors' ``get_3DTransMorph_config`` (OASIS and IXI checkpoints "TransMorph"), our key names
TRANSMORPH_CONFIG: dict[str, Any] = {
    "variant": "half",
    "patch_size": 4,
    "in_chans": 2,
    "embed_dim": 96,
    "depths": (2, 2, 4, 2),
    "num_heads": (4, 4, 8, 8),
    "window_size": (5, 6, 7),
    "mlp_ratio": 4.0,
    "pat_merg_rf": 4,
    "qkv_bias": False,
    "rpe": True,
    "if_transskip": True,
    "if_convskip": True,
    "reg_head_chan": 16,
    "img_size": (160, 192, 224),
}
ATTENTION_MASK_VALUE = -100.0  # the authors' (Swin's) value for pairs of tokens from different shifted regions


def transmorph_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default configuration with ``overrides``; unknown keys raise ValueError."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(TRANSMORPH_CONFIG))
    if unknown:
        raise ValueError(f"unknown TransMorph config keys {unknown}")
    config = {**TRANSMORPH_CONFIG, **overrides}
    if config["variant"] not in ("half", "full"):
        raise ValueError(f"TransMorph variant must be 'half' or 'full' (got {config['variant']!r})")
    for key in ("depths", "num_heads", "window_size", "img_size"):
        config[key] = tuple(int(v) for v in config[key])
    return config


# ---------------------------------------------------------------------- Swin encoder


def to_windows(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """``(B, D, H, W, C)`` (sizes multiples of ``window``) -> ``(B * windows, wd * wh * ww, C)``, windows in
    raster order, tokens raster-ordered inside each window."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, c)


def from_windows(windows: torch.Tensor, window: tuple[int, int, int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`to_windows`: ``(B * windows, tokens, C)`` -> ``(B, D, H, W, C)``."""
    d, h, w = shape
    wd, wh, ww = window
    c = windows.shape[-1]
    x = windows.view(-1, d // wd, h // wh, w // ww, wd, wh, ww, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, d, h, w, c)


def relative_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """``(T, T)`` int64 (``T`` tokens of a window): row of the bias table for each token pair, the
    offset ``a - b`` shifted to non-negative and read as a mixed-radix number (bases ``2 w - 1``)."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in window), indexing="ij")).flatten(1)  # (3, T)
    offset = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (T, T, 3)
    offset = offset + torch.tensor([n - 1 for n in window])
    radix = torch.tensor([(2 * window[1] - 1) * (2 * window[2] - 1), 2 * window[2] - 1, 1])
    return (offset * radix).sum(-1)


def shifted_window_mask(padded: tuple[int, int, int], window: tuple[int, int, int],
                        shift: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """``(windows, T, T)`` additive mask for the cyclically shifted windows: 0 between tokens of the same
    region of the unshifted volume (per axis: ``[0, P - w)``, ``[P - w, P - s)``, ``[P - s, P)``), -100 else."""
    labels = torch.zeros((1, *padded, 1), device=device)
    ranges = [((0, p - w), (p - w, p - s), (p - s, p)) for p, w, s in zip(padded, window, shift)]
    for label, (rd, rh, rw) in enumerate(itertools.product(*ranges)):
        labels[:, rd[0]:rd[1], rh[0]:rh[1], rw[0]:rw[1], :] = label
    regions = to_windows(labels, window).squeeze(-1)  # (windows, T)
    different = regions[:, None, :] != regions[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, ATTENTION_MASK_VALUE)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, window: tuple[int, int, int], heads: int, qkv_bias: bool, rpe: bool) -> None:
        super().__init__()
        self.window, self.heads, self.rpe = window, heads, rpe
        self.scale = (dim // heads) ** -0.5
        table_rows = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_rows, heads))
        if rpe:
            self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``(B * windows, T, C)``; ``mask`` ``(windows, T, T)`` or None."""
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B * windows, heads, T, T)
        if self.rpe:
            bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
            scores = scores + bias.view(tokens, tokens, -1).permute(2, 0, 1)[None]
        if mask is not None:
            windows = mask.shape[0]
            scores = scores.view(-1, windows, self.heads, tokens, tokens) + mask[None, :, None]
            scores = scores.view(-1, self.heads, tokens, tokens)
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], shift: tuple[int, int, int],
                 mlp_ratio: float, qkv_bias: bool, rpe: bool) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, qkv_bias, rpe)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int], mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, D * H * W, C)`` tokens of a ``shape`` = (D, H, W) volume."""
        batch, _, channels = x.shape
        y = self.norm1(x).view(batch, *shape, channels)
        pads = [(-n) % w for n, w in zip(shape, self.window)]
        y = F.pad(y, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = tuple(y.shape[1:4])
        shifted = min(self.shift) > 0
        if shifted:
            y = torch.roll(y, shifts=tuple(-s for s in self.shift), dims=(1, 2, 3))
        y = from_windows(self.attn(to_windows(y, self.window), mask if shifted else None), self.window, padded)
        if shifted:
            y = torch.roll(y, shifts=self.shift, dims=(1, 2, 3))
        y = y[:, :shape[0], :shape[1], :shape[2]].reshape(batch, -1, channels)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2x2 cells -> one token: concatenation (the authors' order), LayerNorm, linear ``8C -> 8C / rf``."""

    #: (d, h, w) offsets in the order of the authors' concatenation
    ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1))

    def __init__(self, dim: int, reduce_factor: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, (8 // reduce_factor) * dim, bias=False)

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        if any(n % 2 for n in shape):
            raise ValueError(f"TransMorph patch merging needs even sizes (got {shape}): the input size must be a "
                             "multiple of 32 along every axis")
        batch, _, channels = x.shape
        x = x.view(batch, *shape, channels)
        cells = [x[:, d::2, h::2, w::2, :] for d, h, w in self.ORDER]
        return self.reduction(self.norm(torch.cat(cells, dim=-1).view(batch, -1, 8 * channels)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: tuple[int, int, int], mlp_ratio: float,
                 qkv_bias: bool, rpe: bool, merge: bool, reduce_factor: int) -> None:
        super().__init__()
        self.window = window
        self.shift = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, (0, 0, 0) if i % 2 == 0 else self.shift, mlp_ratio, qkv_bias, rpe)
            for i in range(depth))
        self.downsample = PatchMerging(dim, reduce_factor) if merge else None

    def forward(self, x: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens of this stage and, when it merges, those of the next (half the size, rounded up)."""
        padded = tuple(-(-n // w) * w for n, w in zip(shape, self.window))
        mask = shifted_window_mask(padded, self.window, self.shift, x.device)
        for block in self.blocks:
            x = block(x, shape, mask)
        return x, (self.downsample(x, shape) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [(-n) % self.patch for n in x.shape[2:]]
        x = self.proj(F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0])))
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class SwinEncoder(nn.Module):
    """``(N, 2, D, H, W)`` -> four feature maps ``(N, C * 2^i, D / 2^(i+2), ...)``, i = 0..3."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        dim, depths = int(config["embed_dim"]), config["depths"]
        self.patch_embed = PatchEmbed(int(config["patch_size"]), int(config["in_chans"]), dim)
        self.layers = nn.ModuleList(
            SwinStage(dim * 2 ** i, depths[i], config["num_heads"][i], config["window_size"], float(config["mlp_ratio"]),
                      bool(config["qkv_bias"]), bool(config["rpe"]), i < len(depths) - 1, int(config["pat_merg_rf"]))
            for i in range(len(depths)))
        for i in range(len(depths)):
            self.add_module(f"norm{i}", nn.LayerNorm(dim * 2 ** i))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        shape = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        outputs = []
        for i, stage in enumerate(self.layers):
            out, merged = stage(x, shape)
            out = getattr(self, f"norm{i}")(out)
            outputs.append(out.view(-1, *shape, out.shape[-1]).permute(0, 4, 1, 2, 3).contiguous())
            if merged is not None:
                x, shape = merged, tuple((n + 1) // 2 for n in shape)
        return outputs


# ---------------------------------------------------------------------- decoder and the whole network


class ConvNormReLU(nn.Sequential):
    """3x3x3 convolution (no bias), InstanceNorm (no affine), LeakyReLU 0.01: keys ``0.weight``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.InstanceNorm3d(out_channels), nn.LeakyReLU(0.01))


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvNormReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class IndexGrid(nn.Module):
    """The authors' ``SpatialTransformer``: only its buffer ``grid`` ``(1, 3, D, H, W)`` (voxel indices)."""

    def __init__(self, size: tuple[int, int, int]) -> None:
        super().__init__()
        grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in size), indexing="ij"))[None].float()
        self.register_buffer("grid", grid)


class TransMorph(nn.Module):
    """See the module docstring; ``config`` as :data:`TRANSMORPH_CONFIG` (overrides merged)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config = transmorph_config(config)
        dim, head, full = int(config["embed_dim"]), int(config["reg_head_chan"]), config["variant"] == "full"
        trans, conv = bool(config["if_transskip"]), bool(config["if_convskip"])
        self.transformer = SwinEncoder(config)
        self.up0 = DecoderBlock(8 * dim, 4 * dim, 4 * dim if trans else 0)
        self.up1 = DecoderBlock(4 * dim, 2 * dim, 2 * dim if trans else 0)
        self.up2 = DecoderBlock(2 * dim, dim, dim if trans else 0)
        self.up3 = DecoderBlock(dim, dim // 2 if full else head, dim // 2 if conv else 0)
        if full:
            self.up4 = DecoderBlock(dim // 2, head, head if conv else 0)
        self.c1 = ConvNormReLU(2, dim // 2)
        self.c2 = ConvNormReLU(2, head)
        self.reg_head = nn.Sequential(nn.Conv3d(head, 3, 3, padding=1))
        self.spatial_trans = IndexGrid(config["img_size"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.config["img_size"])

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Displacement ``(N, 3, D, H, W)`` in voxels (fixed ``p`` -> moving ``p + u(p)``); inputs ``(N, 1, D, H, W)``
        with D, H, W multiples of 32 (the authors' ``img_size`` for their checkpoints)."""
        pair = torch.cat([moving, fixed], dim=1)
        conv = bool(self.config["if_convskip"])
        half_skip = self.c1(F.avg_pool3d(pair, 3, stride=2, padding=1)) if conv else None
        features = self.transformer(pair)
        skips = features[-2::-1] if self.config["if_transskip"] else [None, None, None]
        x = self.up0(features[-1], skips[0])
        x = self.up1(x, skips[1])
        x = self.up2(x, skips[2])
        x = self.up3(x, half_skip)
        if self.config["variant"] == "full":
            return self.reg_head(self.up4(x, self.c2(pair) if conv else None))
        return F.interpolate(self.reg_head(x), scale_factor=2, mode="trilinear", align_corners=False)


def load_transmorph(path: str, config: dict[str, Any] | None = None, device: torch.device | str = "cpu") -> TransMorph:
    """The network with the authors' checkpoint ``path`` (``torch.save`` of a dict with ``'state_dict'``,
    or a bare state dict; read with ``weights_only=True``), strictly: every key and shape must match."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"] if isinstance(checkpoint, dict) and "state_dict" in checkpoint else checkpoint
    network = TransMorph(config)
    network.load_state_dict(state, strict=True)
    return network.to(device).eval()
