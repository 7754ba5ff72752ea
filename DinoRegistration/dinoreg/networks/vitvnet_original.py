"""ViT-V-Net as its authors published it (Chen et al., 2021, arXiv 2104.06468; the version in the
TransMorph repository, ``IXI/Baseline_Transformers/models/ViTVNet.py``), written here so that
their checkpoints (``*.pth.tar``: a dict with ``'state_dict'``) load with ``strict=True``.

Why a second ViT-V-Net: ``networks/vitvnet.py`` is our trainable baseline (torch's
``nn.TransformerEncoder`` with fused projections, an interpolated position volume, any input
size); the authors' tensors (separate query/key/value, one position embedding per token of a fixed
input size, batch-normalised decoder) cannot be mapped onto it one to one.

Architecture (module names are the authors'; ``config`` keys are their ``configs_ViTVNet.py``
names):

- ``transformer.embeddings.hybrid_model``: ``inc`` (two 3x3x3 convolutions + ReLU, full size),
  ``down1``/``down2`` (max pool 2, then the same): features at 1, 1/2, 1/4 size, plus
  ``down_num`` further max pools of the last one (skips at 1/8, 1/16).
- ``patch_embeddings``: a ``patch_size``^3 stride convolution of the 1/4 features to
  ``hidden_size`` tokens, plus ``position_embeddings`` (one per token: the input size is fixed).
- ``transformer.encoder``: ``num_layers`` pre-norm blocks (LayerNorm eps 1e-6, multi-head
  attention with separate ``query/key/value/out`` linears, GELU MLP ``fc1/fc2``), ``encoder_norm``.
- ``decoder``: ``conv_more`` (3x3x3 convolution without bias, BatchNorm, ReLU) to
  ``conv_first_channel``, then one block per ``decoder_channels`` entry: trilinear x2
  (``align_corners=False``), concatenation with the next skip (coarse to fine), two (convolution,
  BatchNorm, ReLU).
- ``reg_head``: a 3x3x3 convolution to 3 channels: the displacement in voxels, at full size.
- ``spatial_trans.grid``: the voxel index grid the authors keep as a buffer (in their checkpoints).

Convention as ``networks/transmorph.py``: ``forward(moving, fixed)`` (their input is
``[moving, fixed]``) returns ``u`` ``(N, 3, D, H, W)`` in voxels, fixed ``p`` -> moving ``p + u(p)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinoreg.networks.transmorph import IndexGrid

#: the authors' ``get_3DReg_config`` with the IXI input size (their ``img_size`` argument)
VITVNET_CONFIG: dict[str, Any] = {
    "hidden_size": 252,
    "mlp_dim": 3072,
    "num_heads": 12,
    "num_layers": 12,
    "patch_size": 8,
    "conv_first_channel": 512,
    "encoder_channels": (16, 32, 32),
    "down_num": 2,
    "decoder_channels": (96, 48, 32, 32, 16),
    "skip_channels": (32, 32, 32, 32, 16),
    "n_skip": 5,
    "img_size": (160, 192, 224),
}
ENCODER_DOWN = 4  # the CNN encoder halves the size twice before the patch embedding


def vitvnet_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default configuration with ``overrides``; unknown keys raise ValueError."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(VITVNET_CONFIG))
    if unknown:
        raise ValueError(f"unknown ViT-V-Net config keys {unknown}")
    config = {**VITVNET_CONFIG, **overrides}
    for key in ("encoder_channels", "decoder_channels", "skip_channels", "img_size"):
        config[key] = tuple(int(v) for v in config[key])
    return config


class DoubleConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.ReLU(),
                                         nn.Conv3d(out_channels, out_channels, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool3d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class CNNEncoder(nn.Module):
    def __init__(self, channels: tuple[int, int, int], down_num: int) -> None:
        super().__init__()
        self.down_num = down_num
        self.inc = DoubleConv(2, channels[0])
        self.down1 = Down(channels[0], channels[1])
        self.down2 = Down(channels[1], channels[2])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The 1/4-size features and the skips, coarsest first."""
        full = self.inc(x)
        half = self.down1(full)
        quarter = self.down2(half)
        skips = [full, half, quarter]
        for _ in range(self.down_num):
            skips.append(F.max_pool3d(skips[-1], 2))
        return quarter, skips[::-1]


class Embeddings(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        patch, hidden = int(config["patch_size"]), int(config["hidden_size"])
        tokens = 1
        for n in config["img_size"]:
            tokens *= n // ENCODER_DOWN // patch
        self.hybrid_model = CNNEncoder(config["encoder_channels"], int(config["down_num"]))
        self.patch_embeddings = nn.Conv3d(config["encoder_channels"][-1], hidden, patch, stride=patch)
        self.position_embeddings = nn.Parameter(torch.zeros(1, tokens, hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features, skips = self.hybrid_model(x)
        tokens = self.patch_embeddings(features).flatten(2).transpose(1, 2)
        return tokens + self.position_embeddings, skips


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        return x.view(batch, tokens, self.heads, hidden // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
        context = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3)
        return self.out(context.reshape(x.shape))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, mlp_dim), nn.Linear(mlp_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, hidden: int, mlp_dim: int, heads: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-6)
        self.ffn = Mlp(hidden, mlp_dim)
        self.attn = Attention(hidden, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attention_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Encoder(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hidden = int(config["hidden_size"])
        self.layer = nn.ModuleList(Block(hidden, int(config["mlp_dim"]), int(config["num_heads"]))
                                   for _ in range(int(config["num_layers"])))
        self.encoder_norm = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)
        return self.encoder_norm(x)


class Transformer(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tokens, skips = self.embeddings(x)
        return self.encoder(tokens), skips


class ConvBNReLU(nn.Sequential):
    """3x3x3 convolution (no bias), BatchNorm, ReLU: keys ``0.weight``, ``1.*``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm3d(out_channels),
                         nn.ReLU())


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class DecoderCup(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.token_shape = tuple(n // ENCODER_DOWN // int(config["patch_size"]) for n in config["img_size"])
        self.n_skip = int(config["n_skip"])
        self.conv_more = ConvBNReLU(int(config["hidden_size"]), int(config["conv_first_channel"]))
        outs = config["decoder_channels"]
        ins = (int(config["conv_first_channel"]),) + outs[:-1]
        skips = tuple(s if i < self.n_skip else 0 for i, s in enumerate(config["skip_channels"]))
        self.blocks = nn.ModuleList(DecoderBlock(i, o, s) for i, o, s in zip(ins, outs, skips))

    def forward(self, tokens: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        batch, _, hidden = tokens.shape
        x = self.conv_more(tokens.transpose(1, 2).reshape(batch, hidden, *self.token_shape))
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < self.n_skip else None)
        return x


class OriginalViTVNet(nn.Module):
    """See the module docstring; ``config`` as :data:`VITVNET_CONFIG` (overrides merged)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config = vitvnet_config(config)
        self.transformer = Transformer(config)
        self.decoder = DecoderCup(config)
        self.reg_head = nn.Sequential(nn.Conv3d(config["decoder_channels"][-1], 3, 3, padding=1))
        self.spatial_trans = IndexGrid(config["img_size"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.config["img_size"])

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Displacement ``(N, 3, D, H, W)`` in voxels; inputs ``(N, 1, *img_size)`` (the size is fixed)."""
        if tuple(fixed.shape[2:]) != self.input_shape:
            raise ValueError(f"ViT-V-Net takes inputs of size {self.input_shape} only (got {tuple(fixed.shape[2:])})")
        tokens, skips = self.transformer(torch.cat([moving, fixed], dim=1))
        return self.reg_head(self.decoder(tokens, skips))


def load_original_vitvnet(path: str, config: dict[str, Any] | None = None,
                          device: torch.device | str = "cpu") -> OriginalViTVNet:
    """The network with the authors' checkpoint ``path`` (dict with ``'state_dict'`` or a bare state dict;
    ``weights_only=True``), strictly."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"] if isinstance(checkpoint, dict) and "state_dict" in checkpoint else checkpoint
    network = OriginalViTVNet(config)
    network.load_state_dict(state, strict=True)
    return network.to(device).eval()
