"""Shared fixtures: small volumes with known geometry, the shared data folder, the engine on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "DinoRegistration"))
SHARED_DATA = Path(os.environ.get("DINOREG_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO = REPO / "Resources" / "Demo"

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the engine does, before torch is imported
import torch  # noqa: E402

# Under pytest-xdist each worker gets one core's worth of threads, so workers don't oversubscribe.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def shared_file(relative: str) -> Path:
    """A file of ../shared/data; skips the test when the shared data is not present."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data {path} not available")
    return path


@pytest.fixture(scope="session")
def brain_scan():
    """The voxelmorph test scan as (image Volume, label Volume), RAS-aligned 1 mm, 160x192x224."""
    from dinoreg.core.volume import Volume

    data = np.load(shared_file("brain/test_scan.npz"))
    image = Volume.from_array_ras(np.ascontiguousarray(data["vol"].transpose(2, 1, 0)).astype(np.float32))
    labels = Volume.from_array_ras(np.ascontiguousarray(data["seg"].transpose(2, 1, 0)).astype(np.int16))
    return image, labels


@pytest.fixture(scope="session")
def brain_scan_2mm(brain_scan):
    """The brain scan and labels downsampled to 2 mm (80x96x112) for fast tests."""
    from dinoreg.core.transforms import Transform, warp_volume

    image, labels = brain_scan
    grid = image.grid.with_spacing(2.0)
    return warp_volume(image, Transform(), grid), warp_volume(labels, Transform(), grid, "nearest")


@pytest.fixture(scope="session")
def tiny_dino_model(tmp_path_factory) -> str:
    """Folder of a one-layer random ViT with the DINOv2-with-registers layout (no pretrained weights exist here)."""
    transformers = pytest.importorskip("transformers")
    import torch

    folder = tmp_path_factory.mktemp("tiny_dino")
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(patch_size=14, image_size=56, num_register_tokens=4, hidden_size=64,
                                                    num_hidden_layers=1, num_attention_heads=1)
    transformers.Dinov2WithRegistersModel(config).eval().save_pretrained(str(folder))
    return str(folder)
