"""The registry of known DINO backbones (``models.json`` next to this file, shipped in the package).

Each entry names a backbone once for the whole product: the short name users type
(``dinov2_vits14_reg``), its Hugging Face hub id, its shape (patch size, width, registers) and
where Meta publishes the original checkpoint. No torch, no transformers: cheap to import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REGISTRY_FILE = Path(__file__).with_name("backbones.json")


@dataclass(frozen=True)
class ModelEntry:
    """One known backbone. ``size_mb`` is the approximate fp32 download size."""

    name: str
    hub_id: str
    family: str  # "dinov2" | "dinov3"
    architecture: str
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    registers: int
    params_millions: float
    size_mb: int
    license: str
    gated: bool
    meta_url: str | None

    @property
    def meta_filename(self) -> str | None:
        """File name of Meta's original checkpoint (e.g. ``dinov2_vits14_reg4_pretrain.pth``)."""
        return self.meta_url.rsplit("/", 1)[-1] if self.meta_url else None


@lru_cache(maxsize=1)
def _load() -> tuple[str, tuple[ModelEntry, ...]]:
    document = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    entries = tuple(ModelEntry(**model) for model in document["models"])
    return document["default"], entries


def known_models() -> list[ModelEntry]:
    """All registry entries, in the file's order."""
    return list(_load()[1])


def default_model_name() -> str:
    return _load()[0]


def find_model(spec: str) -> ModelEntry | None:
    """The entry whose name, hub id or Meta checkpoint file name is ``spec`` (case-insensitive)."""
    key = spec.strip().lower()
    for entry in _load()[1]:
        candidates = {entry.name.lower(), entry.hub_id.lower()}
        if entry.meta_filename:
            candidates.add(entry.meta_filename.lower())
        if key in candidates:
            return entry
    return None
