"""Loading a frozen DINOv2 / DINOv3 backbone through transformers, and encoding 2D images.

``load_backbone(spec, device)`` accepts any model spec (see ``weights.resolve_model``); loaded
models are kept in a small in-process LRU so consecutive registrations do not reload them.
Every loading problem (missing, truncated, mismatched, wrong architecture) becomes a one-line
``InputError``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

import torch

from dinoreg.errors import InputError, one_line
from dinoreg.requirements import ENGINE_REQUIREMENTS
from dinoreg.features.dino.meta_checkpoint import convert_meta_state_dict, read_checkpoint
from dinoreg.store import backbones as store
from dinoreg.store.backbones import (DOWNLOAD_COMMAND, ModelSource, download_model, hub_offline, missing_model_message,
                                     resolve_model)

SUPPORTED_MODEL_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "dinov3_vit": "dinov3"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LRU_SIZE = 2


@dataclass
class Backbone:
    """A frozen ViT: ``encode`` maps ImageNet-normalised RGB images to last-layer patch tokens."""

    model: torch.nn.Module
    family: str  # "dinov2" | "dinov3"
    patch_size: int
    hidden_size: int
    num_prefix_tokens: int  # class token + registers, dropped from the output
    source: str  # where the weights were read from

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``pixels (B, 3, H, W)`` with H, W multiples of the patch size -> tokens ``(B, h*w, C)``.

        Tokens are the final-norm outputs in row-major (h, w) order; ``autocast_dtype`` (fp16 or
        bf16) runs the matmuls in half precision, the output keeps that dtype.
        """
        device_type = pixels.device.type
        enabled = autocast_dtype is not None and autocast_dtype != torch.float32
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=enabled):
            hidden = self.model(pixel_values=pixels).last_hidden_state
        return hidden[:, self.num_prefix_tokens:]


_CACHE: OrderedDict[tuple[str, str], Backbone] = OrderedDict()
_LOCK = threading.Lock()


def load_backbone(spec: str | None, device: torch.device | str = "cpu") -> Backbone:
    """Load (or reuse) the backbone ``spec`` on ``device``, frozen and in eval mode.

    A hub id that is not cached is downloaded when the hub is reachable and ``HF_HUB_OFFLINE`` is
    not set; otherwise a one-line ``InputError`` says where we looked and how to fetch it.
    """
    source = resolve_model(spec)
    device = torch.device(device)
    key = (f"{source.kind}:{source.location}", str(device))
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    backbone = _load_uncached(source, device)
    with _LOCK:
        _CACHE[key] = backbone
        while len(_CACHE) > LRU_SIZE:
            _CACHE.popitem(last=False)
    return backbone


def forget_loaded_backbones() -> None:
    """Drop the in-process model cache (after clearing the weights cache, or to free memory)."""
    with _LOCK:
        _CACHE.clear()


def clear_cache(include_hub: bool = False) -> list[Path]:
    """Delete the downloaded DINO weights (``store.backbones.clear_cache``) and unload models held in memory."""
    removed = store.clear_cache(include_hub=include_hub)
    forget_loaded_backbones()
    return removed


def download_backbone(spec: str, source: str = "hub") -> Path:
    """Fetch a backbone into the store; Meta checkpoints are converted to a Hugging Face folder on the way."""
    return download_model(spec, source=source, convert=save_converted_checkpoint)


def _load_uncached(source: ModelSource, device: torch.device) -> Backbone:
    if source.kind == "hub":
        if hub_offline():
            raise InputError(missing_model_message(source))
        folder = download_model(source.fetch_name)
        source = ModelSource(source.spec, "hf_folder", str(folder), source.entry)
    try:
        if source.kind == "meta_checkpoint":
            model = load_meta_checkpoint(source.location)
        else:
            model = load_hf_folder(source.location)
    except InputError:
        raise
    except Exception as error:
        raise InputError(load_failure_message(error, source)) from None
    return _wrap(model, source.location, device)


#: substrings of errors raised by readers of damaged files (safetensors, torch.load, zip, pickle)
_DAMAGED_FILE_SIGNS = ("deserializ", "header", "unexpected end", "eof", "truncat", "corrupt", "zip", "unpickl",
                       "invalid load key", "incomplete", "magic number", "failed to read", "safetensor")


def transformers_requirement() -> str:
    """'transformers>=5' (or '>=4.56' on Python 3.9, which transformers 5 does not support) for this Python."""
    return ENGINE_REQUIREMENTS["transformers"]


def transformers_version() -> str:
    try:

        return version("transformers")
    except Exception:
        return "not installed"


def load_failure_message(error: BaseException, source: ModelSource) -> str:
    """One line saying what really failed when a backbone does not load, and the fix for that cause
    (only a damaged file is worth deleting and downloading again)."""
    what = f"cannot load the DINO model from {source.location}"
    detail = one_line(error, 140)
    text = f"{type(error).__name__}: {error}".lower()
    if isinstance(error, ImportError):
        return (f"{what}: the installed transformers ({transformers_version()}) cannot build it ({detail}): "
                f"install {transformers_requirement()} (pip install -U '{transformers_requirement()}')")
    if "does not recognize this architecture" in text or "unrecognized model" in text or (
            isinstance(error, (KeyError, ValueError)) and "model_type" in text):
        return (f"{what}: transformers {transformers_version()} does not know this model type ({detail}): "
                f"install {transformers_requirement()} (pip install -U '{transformers_requirement()}')")
    if isinstance(error, MemoryError) or "out of memory" in text or "cannot allocate memory" in text:
        return f"{what}: not enough memory to load it ({detail}): close other programs or use a smaller model"
    if isinstance(error, PermissionError):
        return f"{what}: permission denied ({detail}): make the file readable or copy it to a folder you own"
    if any(sign in text for sign in _DAMAGED_FILE_SIGNS):
        return (f"{what}: the file is truncated or corrupted ({detail}): delete it and fetch it again "
                f"({DOWNLOAD_COMMAND} {source.fetch_name})")
    return (f"{what} ({detail}): check that it is a DINOv2/DINOv3 checkpoint, and with transformers "
            f"{transformers_version()} installed ({transformers_requirement()} is needed)")


def _wrap(model: torch.nn.Module, location: str, device: torch.device) -> Backbone:
    config = model.config
    patch = config.patch_size if isinstance(config.patch_size, int) else int(config.patch_size[0])
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    model = model.to(device).eval().requires_grad_(False)
    return Backbone(model=model, family=SUPPORTED_MODEL_TYPES[config.model_type], patch_size=int(patch),
                    hidden_size=int(config.hidden_size), num_prefix_tokens=1 + registers, source=location)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (our errors say what matters)."""
    from transformers.utils import logging as hf_logging  # optional, heavy: DINO methods only

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf_folder(folder: str | Path) -> torch.nn.Module:
    """A transformers DINOv2/DINOv3 model from a local folder (config.json + safetensors)."""
    from transformers import AutoConfig, AutoModel  # optional, heavy: DINO methods only

    folder = Path(folder)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise InputError(f"{folder} holds a '{config.model_type}' model: DINO features need a DINOv2 or DINOv3 "
                             f"backbone ({', '.join(SUPPORTED_MODEL_TYPES)})")
        model, info = AutoModel.from_pretrained(str(folder), config=config, local_files_only=True,
                                                output_loading_info=True, ignore_mismatched_sizes=True)
    mismatched = sorted(str(item[0] if isinstance(item, tuple) else item) for item in info.get("mismatched_keys", ()))
    if mismatched:
        raise InputError(f"{folder}: {len(mismatched)} weights do not match the shapes in its config.json "
                         f"(e.g. '{mismatched[0]}'): the checkpoint belongs to another architecture or is corrupted")
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise InputError(f"{folder}: {len(missing)} weights are missing from the checkpoint (e.g. '{missing[0]}'): "
                         f"the download is incomplete or the file is not a DINO backbone")
    return model


def load_meta_checkpoint(path: str | Path, num_heads: int | None = None) -> torch.nn.Module:
    """A transformers model converted on load from a Meta ``.pth`` (see ``meta_checkpoint``)."""
    state = read_checkpoint(path)
    config, model_class, converted = convert_meta_state_dict(state, str(path), num_heads=num_heads)
    with quiet_transformers():
        model = model_class.from_pretrained(None, config=config, state_dict=converted)
    return model


def save_converted_checkpoint(checkpoint: str | Path, folder: str | Path, num_heads: int | None = None) -> Path:
    """Convert a Meta checkpoint once and save it as a Hugging Face folder (safetensors)."""
    model = load_meta_checkpoint(checkpoint, num_heads=num_heads)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def imagenet_normalise(grey: torch.Tensor) -> torch.Tensor:
    """Grey images ``(B, 1, H, W)`` in [0, 1] -> RGB ``(B, 3, H, W)`` normalised with ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=grey.dtype, device=grey.device).view(1, 3, 1, 1)
    return (grey.expand(-1, 3, -1, -1) - mean) / std
