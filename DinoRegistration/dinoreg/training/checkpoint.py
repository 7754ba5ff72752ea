"""Resumable training checkpoints (``checkpoint.pt`` in the run folder), written atomically.

A checkpoint holds the network, optimiser and scheduler states, the step reached, the wall time
spent so far and the validation history; the data generators are re-seeded from (seed, rank, step)
at every step, so a resumed run draws exactly the pairs the uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``folder/checkpoint.pt`` through a temporary file (never half-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_NAME
    partial = folder / (CHECKPOINT_NAME + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The state saved in ``folder`` (None when there is none)."""
    path = folder / CHECKPOINT_NAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
