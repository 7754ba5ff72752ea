"""Meta's original DINOv2 / DINOv3 checkpoints (``dinov2_vits14_reg4_pretrain.pth`` ...) -> transformers.

The architecture is inferred from tensor shapes: width from ``cls_token``, patch size from
``patch_embed.proj.weight``, depth from the ``blocks.N`` indices, registers from
``register_tokens`` (DINOv2) or ``storage_tokens`` (DINOv3), position grid from ``pos_embed``
(DINOv2), MLP type from ``mlp.fc1`` / ``mlp.w12`` / ``mlp.w1``. The number of heads is not stored
in a checkpoint: every released DINOv2/DINOv3 model up to ViT-H uses 64-dimensional heads.

Key mapping, DINOv2 (``Dinov2Model`` / ``Dinov2WithRegistersModel``):

    cls_token, mask_token, register_tokens -> embeddings.*       pos_embed -> embeddings.position_embeddings
    patch_embed.proj.*                     -> embeddings.patch_embeddings.projection.*
    blocks.i.norm1/norm2                   -> encoder.layer.i.norm1/norm2
    blocks.i.attn.qkv (3D rows: q, k, v)   -> encoder.layer.i.attention.{q,k,v}_proj
    blocks.i.attn.proj                     -> encoder.layer.i.attention.o_proj
    blocks.i.ls1.gamma / ls2.gamma         -> encoder.layer.i.layer_scale1/2.lambda1
    blocks.i.mlp.fc1 / fc2                 -> encoder.layer.i.mlp.fc1 / fc2
    blocks.i.mlp.w12 (rows: gate, up), w3  -> encoder.layer.i.mlp.gate_proj, up_proj, down_proj (ViT-g)
    norm                                   -> layernorm

DINOv3 (``DINOv3ViTModel``): the same with ``storage_tokens -> embeddings.register_tokens``,
``patch_embed.proj -> embeddings.patch_embeddings``, ``blocks.i -> model.layer.i``,
``mlp.fc1/fc2 -> mlp.up_proj/down_proj``, ``mlp.w1/w2/w3 -> mlp.gate_proj/up_proj/down_proj``,
``norm -> norm``; the masked key bias (``qkv.bias * qkv.bias_mask``) is dropped and
``rope_embed.periods`` gives the RoPE base.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from dinoreg.errors import InputError, one_line

HEAD_DIM = 64
WRAPPER_KEYS = ("model", "teacher", "state_dict", "module")
PREFIXES = ("module.", "backbone.", "model.")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    Training wrappers (``{"model": ...}``, ``{"teacher": ...}``) and ``module.``/``backbone.``
    prefixes are removed. Unreadable files raise a one-line ``InputError``.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file  # lazy: only when model weights are read or written

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch weights file "
                         f"({one_line(error, 120)}); delete it and download it again") from None
    return unwrap_state_dict(state, path)


def unwrap_state_dict(state: Any, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict) and "cls_token" not in state:
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict of tensors: not a DINOv2/DINOv3 checkpoint")
    for prefix in PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    # training checkpoints with block chunks: blocks.<chunk>.<index>.* -> blocks.<index>.*
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key): value for key, value in state.items()}


class _Keys:
    """Takes tensors out of a state dict, remembering what was consumed."""

    def __init__(self, state: dict[str, torch.Tensor], path: str) -> None:
        self.state = dict(state)
        self.path = path

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise InputError(f"{self.path} is not a complete DINO checkpoint: missing weight '{key}'")
        return self.state.pop(key)

    def take_optional(self, key: str) -> torch.Tensor | None:
        return self.state.pop(key, None)

    def finish(self) -> None:
        if self.state:
            extra = sorted(self.state)
            raise InputError(f"{self.path} has {len(extra)} weights this converter does not know "
                             f"(e.g. '{extra[0]}'): not a supported DINOv2/DINOv3 backbone checkpoint")


def convert_meta_state_dict(state: dict[str, torch.Tensor], path: str = "checkpoint",
                            num_heads: int | None = None) -> tuple[Any, type, dict[str, torch.Tensor]]:
    """Meta state dict -> ``(transformers config, model class, HF state dict)``, validated.

    Every Meta key must be consumed and every HF weight produced with the right shape; otherwise
    a one-line ``InputError`` names the first problem.
    """
    if "pos_embed" in state:
        config, model_class, converted = _convert_dinov2(_Keys(state, path), num_heads)
    elif "storage_tokens" in state or "rope_embed.periods" in state:
        config, model_class, converted = _convert_dinov3(_Keys(state, path), num_heads)
    elif any(key.startswith("embeddings.") for key in state):
        raise InputError(f"{path} holds Hugging Face weights: give the folder that contains it and its config.json")
    else:
        raise InputError(f"{path} is not a DINOv2/DINOv3 checkpoint: it has no 'pos_embed' or 'storage_tokens'")
    check_against_model(converted, config, model_class, path)
    return config, model_class, converted


def _layer_count(keys: _Keys) -> int:
    indices = {int(m.group(1)) for key in keys.state if (m := re.match(r"^blocks\.(\d+)\.", key))}
    if not indices:
        raise InputError(f"{keys.path} has no transformer blocks ('blocks.N.*'): not a DINO checkpoint")
    count = max(indices) + 1
    missing = sorted(set(range(count)) - indices)
    if missing:
        raise InputError(f"{keys.path} is not a complete DINO checkpoint: block {missing[0]} is missing")
    return count


def _heads(hidden: int, num_heads: int | None, path: str) -> int:
    if num_heads:
        if hidden % num_heads:
            raise InputError(f"{path}: width {hidden} is not divisible by num_heads={num_heads}")
        return num_heads
    if hidden % HEAD_DIM:
        raise InputError(f"{path}: cannot infer the number of attention heads for width {hidden} "
                         f"(not a multiple of {HEAD_DIM})")
    return hidden // HEAD_DIM


def _split_rows(tensor: torch.Tensor, parts: int, key: str, path: str) -> list[torch.Tensor]:
    if tensor.shape[0] % parts:
        raise InputError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, not divisible into {parts} parts")
    return list(tensor.chunk(parts, dim=0))


def _convert_dinov2(keys: _Keys, num_heads: int | None) -> tuple[Any, type, dict[str, torch.Tensor]]:
    from transformers import (Dinov2Config, Dinov2Model,  # optional, heavy: DINO methods only
                              Dinov2WithRegistersConfig, Dinov2WithRegistersModel)

    out: dict[str, torch.Tensor] = {}
    cls_token = keys.take("cls_token")
    hidden = int(cls_token.shape[-1])
    pos_embed = keys.take("pos_embed")
    patch_weight = keys.take("patch_embed.proj.weight")
    patch = int(patch_weight.shape[-1])
    side = math.isqrt(max(int(pos_embed.shape[1]) - 1, 0))
    if pos_embed.ndim != 3 or side * side != pos_embed.shape[1] - 1:
        raise InputError(f"{keys.path}: pos_embed has shape {tuple(pos_embed.shape)}, expected (1, 1 + n*n, width)")
    registers = keys.take_optional("register_tokens")
    mask_token = keys.take_optional("mask_token")
    out["embeddings.cls_token"] = cls_token
    out["embeddings.position_embeddings"] = pos_embed
    out["embeddings.patch_embeddings.projection.weight"] = patch_weight
    out["embeddings.patch_embeddings.projection.bias"] = keys.take("patch_embed.proj.bias")
    if mask_token is not None:
        out["embeddings.mask_token"] = mask_token.reshape(1, hidden)
    if registers is not None:
        out["embeddings.register_tokens"] = registers
    layers = _layer_count(keys)
    swiglu = keys.has("blocks.0.mlp.w12.weight")
    qkv_bias = keys.has("blocks.0.attn.qkv.bias")
    mlp_ratio = 4
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[f"{dst}{norm}.{p}"] = keys.take(f"{src}{norm}.{p}")
        for p in ("weight", "bias") if qkv_bias else ("weight",):
            q, k, v = _split_rows(keys.take(f"{src}attn.qkv.{p}"), 3, f"{src}attn.qkv.{p}", keys.path)
            out[f"{dst}attention.q_proj.{p}"], out[f"{dst}attention.k_proj.{p}"], out[f"{dst}attention.v_proj.{p}"] = q, k, v
        for p in ("weight", "bias"):
            out[f"{dst}attention.o_proj.{p}"] = keys.take(f"{src}attn.proj.{p}")
        out[f"{dst}layer_scale1.lambda1"] = keys.take(f"{src}ls1.gamma")
        out[f"{dst}layer_scale2.lambda1"] = keys.take(f"{src}ls2.gamma")
        for p in ("weight", "bias"):
            if swiglu:
                gate, up = _split_rows(keys.take(f"{src}mlp.w12.{p}"), 2, f"{src}mlp.w12.{p}", keys.path)
                out[f"{dst}mlp.gate_proj.{p}"], out[f"{dst}mlp.up_proj.{p}"] = gate, up
                out[f"{dst}mlp.down_proj.{p}"] = keys.take(f"{src}mlp.w3.{p}")
            else:
                out[f"{dst}mlp.fc1.{p}"] = keys.take(f"{src}mlp.fc1.{p}")
                out[f"{dst}mlp.fc2.{p}"] = keys.take(f"{src}mlp.fc2.{p}")
    if not swiglu:
        mlp_width = int(out["encoder.layer.0.mlp.fc1.weight"].shape[0])
        if mlp_width % hidden:
            raise InputError(f"{keys.path}: MLP width {mlp_width} is not a multiple of the width {hidden}: unsupported")
        mlp_ratio = mlp_width // hidden
    out["layernorm.weight"] = keys.take("norm.weight")
    out["layernorm.bias"] = keys.take("norm.bias")
    keys.finish()
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=_heads(hidden, num_heads, keys.path),
                  mlp_ratio=mlp_ratio, patch_size=patch, image_size=side * patch, qkv_bias=qkv_bias,
                  use_swiglu_ffn=swiglu, layer_norm_eps=1e-6, layerscale_value=1.0)
    if registers is not None:
        return Dinov2WithRegistersConfig(num_register_tokens=int(registers.shape[1]), **common), \
            Dinov2WithRegistersModel, out
    return Dinov2Config(use_mask_token=mask_token is not None, **common), Dinov2Model, out


def _convert_dinov3(keys: _Keys, num_heads: int | None) -> tuple[Any, type, dict[str, torch.Tensor]]:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel  # optional, heavy: DINO methods only

    out: dict[str, torch.Tensor] = {}
    cls_token = keys.take("cls_token")
    hidden = int(cls_token.shape[-1])
    heads = _heads(hidden, num_heads, keys.path)
    registers = keys.take_optional("storage_tokens")
    registers = registers if registers is not None else torch.zeros(1, 0, hidden)
    patch_weight = keys.take("patch_embed.proj.weight")
    out["embeddings.cls_token"] = cls_token
    out["embeddings.register_tokens"] = registers
    out["embeddings.mask_token"] = keys.take("mask_token").reshape(1, 1, hidden)
    out["embeddings.patch_embeddings.weight"] = patch_weight
    out["embeddings.patch_embeddings.bias"] = keys.take("patch_embed.proj.bias")
    rope_theta = _rope_base(keys.take_optional("rope_embed.periods"), hidden // heads, keys.path)
    layers = _layer_count(keys)
    gated = keys.has("blocks.0.mlp.w1.weight")
    mlp_bias = keys.has("blocks.0.mlp.w1.bias" if gated else "blocks.0.mlp.fc1.bias")
    qkv_has_bias = keys.has("blocks.0.attn.qkv.bias")
    key_bias = False
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"model.layer.{i}."
        for norm in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                out[f"{dst}{norm}.{p}"] = keys.take(f"{src}{norm}.{p}")
        q, k, v = _split_rows(keys.take(f"{src}attn.qkv.weight"), 3, f"{src}attn.qkv.weight", keys.path)
        out[f"{dst}attention.q_proj.weight"], out[f"{dst}attention.k_proj.weight"], out[f"{dst}attention.v_proj.weight"] = q, k, v
        if qkv_has_bias:
            bias = keys.take(f"{src}attn.qkv.bias")
            mask = keys.take_optional(f"{src}attn.qkv.bias_mask")
            bias = bias * mask.to(bias.dtype) if mask is not None else bias
            if not torch.isfinite(bias).all():
                raise InputError(f"{keys.path}: '{src}attn.qkv.bias' is not finite: the checkpoint is corrupted")
            qb, kb, vb = _split_rows(bias, 3, f"{src}attn.qkv.bias", keys.path)
            out[f"{dst}attention.q_proj.bias"], out[f"{dst}attention.v_proj.bias"] = qb, vb
            if bool(kb.abs().max() > 0) or key_bias:
                key_bias = True
                out[f"{dst}attention.k_proj.bias"] = kb
        for p in ("weight", "bias"):
            out[f"{dst}attention.o_proj.{p}"] = keys.take(f"{src}attn.proj.{p}")
        out[f"{dst}layer_scale1.lambda1"] = keys.take(f"{src}ls1.gamma")
        out[f"{dst}layer_scale2.lambda1"] = keys.take(f"{src}ls2.gamma")
        names = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if gated else {"fc1": "up_proj", "fc2": "down_proj"}
        for meta_name, hf_name in names.items():
            for p in ("weight", "bias") if mlp_bias else ("weight",):
                out[f"{dst}mlp.{hf_name}.{p}"] = keys.take(f"{src}mlp.{meta_name}.{p}")
    if key_bias:  # a layer before the first non-zero key bias had none: give it zeros
        for i in range(layers):
            out.setdefault(f"model.layer.{i}.attention.k_proj.bias", torch.zeros(hidden))
    out["norm.weight"] = keys.take("norm.weight")
    out["norm.bias"] = keys.take("norm.bias")
    keys.finish()
    intermediate = out["model.layer.0.mlp.up_proj.weight"].shape[0]
    config = DINOv3ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=int(intermediate),
        patch_size=int(patch_weight.shape[-1]), num_register_tokens=int(registers.shape[1]),
        use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", mlp_bias=mlp_bias,
        query_bias=qkv_has_bias, key_bias=key_bias, value_bias=qkv_has_bias, proj_bias=True,
        layer_norm_eps=1e-5, layerscale_value=1.0, rope_theta=rope_theta, image_size=224,
    )
    return config, DINOv3ViTModel, out


def _rope_base(periods: torch.Tensor | None, head_dim: int, path: str) -> float:
    """RoPE base from Meta's ``periods = base ** (4 k / head_dim)``, k = 0 .. head_dim/4 - 1."""
    if periods is None:
        return 100.0
    periods = periods.double().flatten()
    if periods.numel() != head_dim // 4 or periods.numel() < 2:
        raise InputError(f"{path}: rope_embed.periods has {periods.numel()} values, expected {head_dim // 4} "
                         f"for heads of width {head_dim}")
    base = float(periods[1] ** (head_dim / 4))
    expected = base ** (4 * torch.arange(periods.numel(), dtype=torch.float64) / head_dim)
    if not torch.allclose(periods, expected, rtol=1e-4):
        raise InputError(f"{path}: unsupported RoPE periods (not base ** (4k/head_dim)): cannot convert")
    return base


def check_against_model(converted: dict[str, torch.Tensor], config: Any, model_class: type, path: str) -> None:
    """Compare converted weights with the model the config describes (built on the meta device)."""
    with torch.device("meta"):
        reference = model_class(config)
    expected = {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    if missing or extra:
        first = f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'"
        raise InputError(f"{path} does not match a {config.model_type} model: {len(missing)} weights missing, "
                         f"{len(extra)} unexpected ({first})")
    for name, shape in expected.items():
        if tuple(converted[name].shape) != shape:
            raise InputError(f"{path} has mismatched shapes: '{name}' is {tuple(converted[name].shape)}, the "
                             f"architecture inferred from the checkpoint needs {shape}")
        if not converted[name].is_floating_point():
            raise InputError(f"{path}: '{name}' is not a floating-point tensor: the checkpoint is corrupted")
