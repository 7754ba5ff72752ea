"""Reference fields of the AUTHORS' TransMorph and ViT-V-Net code, for Testing/test_transmorph.py (issue 18).

    .venv/bin/python benchmarks/transmorph_reference.py            # writes Testing/fixtures/transmorph_*.pt
    .venv/bin/python benchmarks/transmorph_reference.py --check    # compares with our module, prints max difference

The authors publish source only. This script exports their files from the fetched repository
(``git show``) into a scratch folder OUTSIDE the project (``/tmp/transmorph_reference``, removed
afterwards), and provides there the three helpers their file imports from ``timm``
(``DropPath``: identity in evaluation mode, ``trunc_normal_``, ``to_3tuple``) and the
``ml_collections.ConfigDict`` their config module imports: ``timm`` does not import with this
project's torch. Nothing of their code enters the project; only its outputs do.

Two fixtures, the two variants of their code, each with random values in every tensor, a small
input and a small ``embed_dim`` (same code path: 4 Swin stages, shifted windows with the attention
mask, window padding, patch merging, both skips):

- ``transmorph_half.pt``: ``OASIS/TransMorph/models/TransMorph.py`` (field at half resolution, then x2)
- ``transmorph_full.pt``: ``IXI/TransMorph/models/TransMorph.py`` (fifth decoder block, full resolution)
- ``vitvnet_original.pt``: ``IXI/Baseline_Transformers/models/ViTVNet.py`` (the ViT-V-Net whose IXI
  checkpoint the repository publishes), batch-norm statistics random too

Each holds the authors' state dict WITHOUT the ``spatial_trans.grid`` buffer (derived from
``img_size``; left out to keep the file small, its shape is in ``keys``), the full list of their
keys and shapes, the input pair and their output displacement.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/junyuchen245+TransMorph_Transformer_for_Medical_Image_Registration/repo")
COMMIT = "6357a1d7fc44c36db9b1d1ccaa372409253142cf"  # the fetched repository's HEAD (2025-05-22)
SCRATCH = Path("/tmp/transmorph_reference")
FIXTURES = ROOT / "Testing" / "fixtures"
SOURCES = {"half": "OASIS/TransMorph/models", "full": "IXI/TransMorph/models",
           "vitvnet": "IXI/Baseline_Transformers/models"}
FILES = {"half": ("TransMorph", "configs_TransMorph"), "full": ("TransMorph", "configs_TransMorph"),
         "vitvnet": ("ViTVNet", "configs_ViTVNet")}
SIZES = {"half": (32, 32, 64), "full": (32, 64, 32), "vitvnet": (32, 32, 64)}
SMALL_VITVNET = {  # our config names (the authors' get_3DReg_config, small sizes)
    "hidden_size": 24, "mlp_dim": 48, "num_heads": 4, "num_layers": 2, "patch_size": 8, "conv_first_channel": 16,
    "encoder_channels": (4, 8, 8), "down_num": 2, "decoder_channels": (16, 8, 8, 8, 4),
    "skip_channels": (8, 8, 8, 8, 4), "n_skip": 5,
}
SMALL = {  # the authors' config names; only sizes differ from get_3DTransMorph_config
    "if_transskip": True, "if_convskip": True, "patch_size": 4, "in_chans": 2, "embed_dim": 6,
    "depths": (2, 2, 4, 2), "num_heads": (1, 2, 2, 4), "window_size": (3, 2, 4), "mlp_ratio": 4,
    "pat_merg_rf": 4, "qkv_bias": False, "drop_rate": 0, "drop_path_rate": 0.3, "ape": False, "spe": False,
    "rpe": True, "patch_norm": True, "use_checkpoint": False, "out_indices": (0, 1, 2, 3), "reg_head_chan": 8,
}

TIMM_STUB = '''
import torch
from torch import nn

class DropPath(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
    def forward(self, x):
        assert not self.training, "reference stub: evaluation mode only"
        return x

def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return nn.init.trunc_normal_(tensor, mean, std, a, b)

def to_3tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x, x)
'''
ML_COLLECTIONS_STUB = '''
class ConfigDict(dict):
    __getattr__ = dict.__getitem__
    def __setattr__(self, key, value):
        self[key] = value
'''


def export(variant: str) -> Path:
    """The authors' model files of ``variant`` in a scratch package ``models`` plus the stubs."""
    folder = SCRATCH / variant
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "models").mkdir(parents=True)
    (folder / "timm" / "models").mkdir(parents=True)
    (folder / "ml_collections").mkdir()
    for name in (f"{stem}.py" for stem in FILES[variant]):
        text = subprocess.run(["git", f"--git-dir={MIRROR}", "show", f"{COMMIT}:{SOURCES[variant]}/{name}"],
                              check=True, capture_output=True, text=True).stdout
        (folder / "models" / name).write_text(text)
    (folder / "models" / "__init__.py").write_text("")
    (folder / "timm" / "__init__.py").write_text("")
    (folder / "timm" / "models" / "__init__.py").write_text("")
    (folder / "timm" / "models" / "layers.py").write_text(TIMM_STUB)
    (folder / "ml_collections" / "__init__.py").write_text(ML_COLLECTIONS_STUB)
    return folder


def authors_module(variant: str):
    folder = export(variant)
    for name in [m for m in sys.modules if m == "models" or m.startswith(("models.", "timm", "ml_collections"))]:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(f"models.{FILES[variant][0]}")
    finally:
        sys.path.remove(str(folder))


def randomise(network: torch.nn.Module, seed: int) -> None:
    """Random values in every floating tensor (norm weights around 1), so that every weight matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in network.state_dict().items():
            if name.endswith("spatial_trans.grid") or not value.is_floating_point():
                continue
            noise = torch.randn(value.shape, generator=generator)
            is_norm_weight = value.dim() == 1 and name.endswith("weight") and ("norm" in name or ".1." in name)
            if name.endswith("running_var"):
                value.copy_(0.5 + torch.rand(value.shape, generator=generator))
            else:
                scale = 0.5 if name.startswith("reg_head") else 0.1  # a field of a few voxels
                value.copy_(1.0 + 0.1 * noise if is_norm_weight else scale * noise)


def reference(variant: str, seed: int = 0) -> dict:
    module = authors_module(variant)
    torch.manual_seed(seed)
    if variant == "vitvnet":
        network = module.ViTVNet(authors_vitvnet_config(module), img_size=SIZES[variant]).eval()
    else:
        network = module.TransMorph(types.SimpleNamespace(**SMALL, img_size=SIZES[variant])).eval()
    randomise(network, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    # inputs exactly representable in float16 (stored as such: half the bytes, same values)
    moving = torch.rand((1, 1, *SIZES[variant]), generator=generator).half().float()
    fixed = torch.rand((1, 1, *SIZES[variant]), generator=generator).half().float()
    with torch.no_grad():
        _, flow = network(torch.cat([moving, fixed], dim=1))
    state = network.state_dict()
    return {
        "source": f"github.com/junyuchen245/TransMorph_Transformer_for_Medical_Image_Registration@{COMMIT}:"
                  f"{SOURCES[variant]}/TransMorph.py",
        "variant": variant,
        "config": {**(SMALL_VITVNET if variant == "vitvnet" else SMALL), "img_size": SIZES[variant]},
        "keys": {key: tuple(value.shape) for key, value in state.items()},
        "state_dict": {key: value.clone() for key, value in state.items() if key != "spatial_trans.grid"},
        "moving": moving.half(), "fixed": fixed.half(), "flow": flow.float(),
    }


def authors_vitvnet_config(module):
    """The authors' ViT-V-Net config object (their ``get_3DReg_config``) with the small sizes."""
    config = module.configs.get_3DReg_config()
    small = SMALL_VITVNET
    config.patches["size"] = (small["patch_size"],) * 3
    config.hidden_size, config.patch_size = small["hidden_size"], small["patch_size"]
    config.transformer["mlp_dim"], config.transformer["num_heads"] = small["mlp_dim"], small["num_heads"]
    config.transformer["num_layers"] = small["num_layers"]
    for key in ("conv_first_channel", "encoder_channels", "down_num", "decoder_channels", "skip_channels", "n_skip"):
        config[key] = small[key]
    return config


def our_config(fixture: dict) -> dict:
    """Our config for a fixture's authors' config."""
    config = fixture["config"]
    if fixture["variant"] == "vitvnet":
        return dict(config)
    keys = ("patch_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "pat_merg_rf",
            "qkv_bias", "rpe", "if_transskip", "if_convskip", "reg_head_chan", "img_size")
    return {"variant": fixture["variant"], **{key: config[key] for key in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with our module instead of writing fixtures")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "DinoRegistration"))
    from dinoreg.networks.transmorph import TransMorph  # noqa: E402
    from dinoreg.networks.vitvnet_original import OriginalViTVNet  # noqa: E402

    FIXTURES.mkdir(parents=True, exist_ok=True)
    try:
        for variant in SOURCES:
            fixture = reference(variant)
            ours = (OriginalViTVNet if variant == "vitvnet" else TransMorph)(our_config(fixture)).eval()
            ours.load_state_dict({**fixture["state_dict"], "spatial_trans.grid": ours.spatial_trans.grid}, strict=True)
            with torch.no_grad():
                field = ours(fixture["moving"].float(), fixture["fixed"].float())
            print(f"{variant}: max |field difference| {float((field - fixture['flow']).abs().max()):.3g} voxel, "
                  f"field max {float(fixture['flow'].abs().max()):.3g} voxel")
            if not args.check:
                path = FIXTURES / ("vitvnet_original.pt" if variant == "vitvnet" else f"transmorph_{variant}.pt")
                torch.save(fixture, path)
                print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    finally:
        shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
