"""Tiny network configurations and a tiny random DINOv2 backbone for tests (real layout, random weights)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CONFIGS = {
    "fmir": {"channels": 6, "context_channels": 4, "context_layers": 2, "levels": 3},
    "fmir-intensity": {"backend": "intensity", "context_channels": 4, "context_layers": 1, "levels": 2},
    "fmir-dino": {"backend": "dino", "channels": 8, "context_channels": 4, "context_layers": 1, "levels": 2,
                  "dino_token_voxels": 4, "dino_slice_stride": 4},
    "unet": {"encoder": [4, 8, 8], "decoder": [8, 4]},
    "vitvnet": {"encoder": [4, 8], "decoder": [8, 4], "embed": 16, "heads": 2, "transformer_layers": 1},
    "dino-vitvnet": {"encoder": [4, 4, 8], "decoder": [8, 4, 4]},
    "dino-encdec": {"encoder": [4, 4, 8], "decoder": [8, 4, 4]},
}


def tiny_dino_folder(root: Path) -> str:
    """A random 1-layer DINOv2-with-registers backbone saved as a Hugging Face folder."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from dinoreg.features.dino.backbones import quiet_transformers

    folder = root / "tiny-dinov2"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, patch_size=14,
                                           image_size=28, num_register_tokens=4, intermediate_size=64)
        with quiet_transformers():
            Dinov2WithRegistersModel(config).save_pretrained(str(folder))
    return str(folder)


def tiny_network_spec(key: str, dino_folder: str | None) -> tuple[str, dict]:
    """(architecture name, config) of a tiny test network; DINO configs point at ``dino_folder``."""
    name = key.split("-intensity")[0].split("-dino")[0] if key.startswith("fmir") else key
    config = dict(TINY_CONFIGS[key])
    if key.startswith("dino-") or config.get("backend") == "dino":
        config["dino_model"] = dino_folder
    return name, config
