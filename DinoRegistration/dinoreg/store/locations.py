"""Where the store keeps files: one cache root for everything the engine downloads or saves."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of our own cache: ``$DINOREG_CACHE`` or ``~/.cache/dinoreg``."""
    return Path(os.environ.get("DINOREG_CACHE") or "~/.cache/dinoreg").expanduser()


def models_dir() -> Path:
    """Downloaded, published and local trained networks: ``$DINOREG_MODELS_DIR``, else ``<cache root>/models``."""
    if os.environ.get("DINOREG_MODELS_DIR"):
        return Path(os.environ["DINOREG_MODELS_DIR"]).expanduser()
    return cache_root() / "models"


def backbones_dir() -> Path:
    """Our DINO weights: ``<cache root>/dino`` (``meta/`` downloads, ``converted/`` HF folders)."""
    return cache_root() / "dino"
