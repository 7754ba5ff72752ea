"""Time DINO features for one volume pair: ``python -m dinoreg.features.dino.benchmark``.

Without ``--model`` a randomly initialised ViT-S/14 with 4 registers (the default backbone's
shape: width 384, 12 layers, 6 heads) is saved to a temporary folder, so the cost can be measured
on machines without pretrained weights (cost does not depend on the weight values). Without
``--scan`` a synthetic 160x192x224 head-like pair is used; with ``--scan file.npz`` the array
``vol`` (indexed [x, y, z], 1 mm, RAS) is the fixed image and a shifted copy the moving one.
Prints wall and CPU seconds and peak resident memory (and peak GPU memory on CUDA); on a shared
machine compare the CPU seconds with ``threads x wall`` to see how much of the wall time was waiting.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dinoreg.core.volume import Volume
from dinoreg.features.dino.backbones import quiet_transformers
from dinoreg.features.dino.slicewise import dino_feature_pair, effective_settings
from dinoreg.peak_memory import peak_rss_mb
from dinoreg.progress import Progress


def random_vits14_reg4(folder: Path) -> str:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel  # optional, heavy: DINO methods only


    config = Dinov2WithRegistersConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                                       image_size=518, num_register_tokens=4)
    with quiet_transformers():
        Dinov2WithRegistersModel(config).save_pretrained(str(folder))
    return str(folder)


def synthetic_head(shape_kji: tuple[int, int, int] = (224, 192, 160)) -> np.ndarray:
    """An ellipsoid 'head' with smooth random texture, zero outside (like a skull-stripped T1)."""
    generator = torch.Generator().manual_seed(0)
    k, j, i = (torch.linspace(-1, 1, n) for n in shape_kji)
    kk, jj, ii = torch.meshgrid(k, j, i, indexing="ij")
    inside = (kk / 0.75) ** 2 + (jj / 0.85) ** 2 + (ii / 0.8) ** 2 < 1
    texture = torch.nn.functional.interpolate(torch.rand(1, 1, 14, 12, 10, generator=generator), size=shape_kji,
                                              mode="trilinear", align_corners=True)[0, 0]
    return (inside * (0.3 + 0.7 * texture)).numpy().astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", help="npz with 'vol' [x, y, z] at 1 mm (default: synthetic 160x192x224)")
    parser.add_argument("--model", help="model spec (default: random ViT-S/14 reg4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="feature parameter, e.g. token_mm=6 slice_stride=3 slice_axes=all")
    args = parser.parse_args(argv)
    params: dict[str, object] = {}
    for item in args.param:
        key, value = item.split("=", 1)
        params[key] = value if key in ("model", "slice_axes", "precision") else float(value)
    params = {k: (int(v) if k in ("slice_stride", "pca_channels", "batch_size") else v) for k, v in params.items()}

    array = np.load(args.scan)["vol"].transpose(2, 1, 0).astype(np.float32) if args.scan else synthetic_head()
    volume = Volume.from_array_ras(np.ascontiguousarray(array))
    fixed = torch.from_numpy(volume.array)[None, None]
    moving = torch.roll(fixed, shifts=(3, -2, 2), dims=(2, 3, 4)) * 1.1
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        params["model"] = args.model or params.get("model") or random_vits14_reg4(Path(tmp) / "vits14_reg4")
        settings = effective_settings(params, device)
        rss_before = (peak_rss_mb() or 0.0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start, cpu_start = time.perf_counter(), time.process_time()
        fixed_features, _ = dino_feature_pair(fixed, moving, volume.grid, None, None, params, device, Progress())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = (peak_rss_mb() or 0.0)
    print(f"grid {volume.grid.describe()}; settings {settings}")
    print(f"dino features for the pair: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU; output {tuple(fixed_features.shape)}; "
          f"peak RSS {peak:.0f} MB (before features {rss_before:.0f} MB); torch threads {torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
