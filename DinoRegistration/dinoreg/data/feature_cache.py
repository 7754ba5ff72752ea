"""On-disk cache of frozen-encoder features, so that training on a fixed set of volumes computes
each volume's (DINO, MIND ...) features once.

A cached entry is keyed by the SHA-256 of the image tensor's bytes, its shape, and the extractor's
identity (a JSON-able dict naming the backbone, its weights hash, the slicing axis, ...); it is a
``.safetensors`` file written atomically. Random on-the-fly data (random shapes, synthesised
brains) never repeats an image and gains nothing from it: the cache is for folder/CSV data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch


class FeatureCache:
    """``get(image, compute)``: the cached features of ``image`` or ``compute(image)`` stored."""

    def __init__(self, folder: str | Path, extractor_identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.identity = json.dumps(extractor_identity, sort_keys=True, default=str)
        self.hits = 0
        self.misses = 0

    def key(self, image: torch.Tensor) -> str:
        digest = hashlib.sha256()
        digest.update(self.identity.encode())
        digest.update(str(tuple(image.shape)).encode())
        digest.update(image.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def get(self, image: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        from safetensors.torch import load_file, save_file  # lazy: only when model weights are read or written

        path = self.folder / f"{self.key(image)}.safetensors"
        if path.exists():
            self.hits += 1
            return load_file(str(path))["features"].to(image.device)
        self.misses += 1
        features = compute(image)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        save_file({"features": features.detach().cpu().contiguous()}, str(partial))
        os.replace(partial, path)
        return features
