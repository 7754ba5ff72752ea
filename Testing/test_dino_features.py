"""DINO feature backend: loading (HF folder, hub cache, Meta .pth), errors, weights CLI, slice-wise features.

No pretrained weights exist in CI: every test builds tiny random backbones (width 128, 2 layers,
64-wide heads like the released models) at test time, in temporary folders, in both formats:
``save_pretrained`` folders (safetensors) and Meta-layout ``.pth`` state dicts made by mapping a
transformers model back to the official key names (``dinov2_checkpoint_layout.txt``).

Run: cd <repo> && PYTHONPATH=DinoRegistration python -m pytest Testing/test_dino_features.py -q
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoreg.errors import InputError
from dinoreg.features import dino
from dinoreg.features.dino import backbones
from dinoreg.features.dino import slicewise
from dinoreg.store import backbones as weights
from dinoreg.features.dino.intensity import looks_like_ct, normalise_intensity
from dinoreg.features.dino.meta_checkpoint import convert_meta_state_dict
from dinoreg.features.dino.pca import JointPCA
from dinoreg.cli.weights import add_weights_subcommand
from dinoreg.progress import Progress
from dinoreg.core.volume import Grid

WIDTH = 128

# ----------------------------------------------------------------------------------------------
# tiny backbones and their Meta-layout twins


def tiny_model(kind: str) -> torch.nn.Module:
    """A random transformers backbone; every parameter randomised so mapping mistakes show."""
    from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel,
                              DINOv3ViTConfig, DINOv3ViTModel)

    torch.manual_seed({"dinov2": 1, "dinov2_reg": 2, "dinov2_swiglu": 3, "dinov3": 4, "dinov3_gated": 5}[kind])
    common = dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=WIDTH // 64)
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(patch_size=14, image_size=56, **common))
    elif kind == "dinov2_swiglu":
        model = Dinov2Model(Dinov2Config(patch_size=14, image_size=56, use_swiglu_ffn=True, **common))
    elif kind == "dinov2_reg":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, image_size=56,
                                                                   num_register_tokens=4, **common))
    else:
        gated = kind == "dinov3_gated"
        model = DINOv3ViTModel(DINOv3ViTConfig(patch_size=16, num_register_tokens=4, intermediate_size=2 * WIDTH,
                                               use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
                                               **common))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0
            parameter.copy_(base + 0.05 * torch.randn_like(parameter))
    return model.eval()


def hf_to_meta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map a transformers DINOv2/DINOv3 model back to Meta's official key names."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config
    v3 = cfg.model_type == "dinov3_vit"
    out = {"cls_token": sd["embeddings.cls_token"]}
    if v3:
        out["storage_tokens"] = sd["embeddings.register_tokens"]
        out["mask_token"] = sd["embeddings.mask_token"].reshape(1, -1)
        out["patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.weight"]
        out["patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.bias"]
        out["rope_embed.periods"] = 1.0 / model.rope_embeddings.inv_freq.detach().clone()
        out["norm.weight"], out["norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    else:
        out["pos_embed"] = sd["embeddings.position_embeddings"]
        out["mask_token"] = sd["embeddings.mask_token"]
        if "embeddings.register_tokens" in sd:
            out["register_tokens"] = sd["embeddings.register_tokens"]
        out["patch_embed.proj.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
        out["patch_embed.proj.bias"] = sd["embeddings.patch_embeddings.projection.bias"]
        out["norm.weight"], out["norm.bias"] = sd["layernorm.weight"], sd["layernorm.bias"]
    for i in range(cfg.num_hidden_layers):
        h, m = (f"model.layer.{i}." if v3 else f"encoder.layer.{i}."), f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            out[f"{m}{norm}.weight"], out[f"{m}{norm}.bias"] = sd[f"{h}{norm}.weight"], sd[f"{h}{norm}.bias"]
        att = f"{h}attention."
        out[f"{m}attn.qkv.weight"] = torch.cat([sd[f"{att}{p}_proj.weight"] for p in "qkv"])
        if v3:
            zeros = torch.zeros(cfg.hidden_size)
            out[f"{m}attn.qkv.bias"] = torch.cat([sd[f"{att}q_proj.bias"], torch.randn(cfg.hidden_size),
                                                 sd[f"{att}v_proj.bias"]])  # k bias is masked out
            out[f"{m}attn.qkv.bias_mask"] = torch.cat([torch.ones(cfg.hidden_size), zeros, torch.ones(cfg.hidden_size)])
        else:
            out[f"{m}attn.qkv.bias"] = torch.cat([sd[f"{att}{p}_proj.bias"] for p in "qkv"])
        out[f"{m}attn.proj.weight"], out[f"{m}attn.proj.bias"] = sd[f"{att}o_proj.weight"], sd[f"{att}o_proj.bias"]
        out[f"{m}ls1.gamma"] = sd[f"{h}layer_scale1.lambda1"]
        out[f"{m}ls2.gamma"] = sd[f"{h}layer_scale2.lambda1"]
        mlp = f"{h}mlp."
        if v3 and cfg.use_gated_mlp:
            names = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
        elif v3:
            names = {"fc1": "up_proj", "fc2": "down_proj"}
        elif cfg.use_swiglu_ffn:
            for p in ("weight", "bias"):
                out[f"{m}mlp.w12.{p}"] = torch.cat([sd[f"{mlp}gate_proj.{p}"], sd[f"{mlp}up_proj.{p}"]])
                out[f"{m}mlp.w3.{p}"] = sd[f"{mlp}down_proj.{p}"]
            continue
        else:
            names = {"fc1": "fc1", "fc2": "fc2"}
        for meta_name, hf_name in names.items():
            for p in ("weight", "bias"):
                out[f"{m}mlp.{meta_name}.{p}"] = sd[f"{mlp}{hf_name}.{p}"]
    return out


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Each test gets empty Hugging Face and dinoreg caches and no model kept in memory."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("DINOREG_CACHE", str(tmp_path / "dinoreg_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network in tests
    backbones.forget_loaded_backbones()
    yield
    backbones.forget_loaded_backbones()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """kind -> (transformers model, HF folder, Meta .pth) for the five tiny architectures."""
    root = tmp_path_factory.mktemp("models")
    files = {}
    for kind in ("dinov2", "dinov2_reg", "dinov2_swiglu", "dinov3", "dinov3_gated"):
        model = tiny_model(kind)
        folder = root / f"{kind}_hf"
        with backbones.quiet_transformers():
            model.save_pretrained(str(folder))
        pth = root / f"{kind}_pretrain.pth"
        torch.save(hf_to_meta(model), pth)
        files[kind] = (model, folder, pth)
    return files


def pixels(patch: int, h: int = 3, w: int = 4, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, 3, h * patch, w * patch)


# ----------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_reg", "dinov2_swiglu", "dinov3", "dinov3_gated"])
def test_meta_checkpoint_reproduces_the_hf_model(model_files, kind):
    model, _, pth = model_files[kind]
    state = torch.load(pth, weights_only=True)
    _, _, converted = convert_meta_state_dict(state, str(pth))
    reference = model.state_dict()
    assert set(converted) == set(reference)  # every HF weight produced, none invented
    for name, tensor in converted.items():
        assert torch.equal(tensor, reference[name]), name
    backbone = dino.load_backbone(str(pth))
    x = pixels(backbone.patch_size)
    with torch.inference_mode():
        expected = model(pixel_values=x).last_hidden_state[:, backbone.num_prefix_tokens:]
    assert torch.allclose(backbone.encode(x), expected, atol=1e-6, rtol=0)


def test_official_vits14_reg4_layout_is_understood():
    """Key names and shapes of dinov2_vits14_reg4_pretrain.pth (dinov2_checkpoint_layout.txt)."""
    block = {"norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
             "attn.proj.weight": (384, 384), "attn.proj.bias": (384,), "ls1.gamma": (384,), "norm2.weight": (384,),
             "norm2.bias": (384,), "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
             "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,), "ls2.gamma": (384,)}
    shapes = {"cls_token": (1, 1, 384), "pos_embed": (1, 1370, 384), "register_tokens": (1, 4, 384),
              "mask_token": (1, 384), "patch_embed.proj.weight": (384, 3, 14, 14), "patch_embed.proj.bias": (384,),
              "norm.weight": (384,), "norm.bias": (384,)}
    shapes.update({f"blocks.{i}.{k}": v for i in range(12) for k, v in block.items()})
    assert len(shapes) == 176
    config, model_class, converted = convert_meta_state_dict({k: torch.zeros(v) for k, v in shapes.items()})
    assert model_class.__name__ == "Dinov2WithRegistersModel"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size, config.num_register_tokens, config.mlp_ratio) == (14, 518, 4, 4)
    assert len(converted) == 176 + 12 * 4  # qkv weight and bias each split in three


@pytest.mark.parametrize("kind,family,patch,prefix", [("dinov2", "dinov2", 14, 1), ("dinov2_reg", "dinov2", 14, 5),
                                                       ("dinov3", "dinov3", 16, 5)])
def test_hf_folder_loads_and_encodes(model_files, kind, family, patch, prefix):
    model, folder, _ = model_files[kind]
    backbone = dino.load_backbone(str(folder))
    assert (backbone.family, backbone.patch_size, backbone.hidden_size, backbone.num_prefix_tokens) == \
        (family, patch, WIDTH, prefix)
    x = pixels(patch)
    tokens = backbone.encode(x)
    assert tokens.shape == (2, 12, WIDTH)
    with torch.inference_mode():
        assert torch.allclose(tokens, model(pixel_values=x).last_hidden_state[:, prefix:])
    assert dino.load_backbone(str(folder)) is backbone  # in-process LRU


def test_hub_cache_snapshot_is_used_offline(model_files, tmp_path):
    """A registry model present in the Hugging Face cache loads with HF_HUB_OFFLINE=1."""
    _, folder, _ = model_files["dinov2_reg"]
    repo = tmp_path / "hf_home" / "hub" / "models--facebook--dinov2-with-registers-small"
    shutil.copytree(folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    assert dino.dino_availability("dinov2_vits14_reg").ok
    assert dino.dino_availability("facebook/dinov2-with-registers-small").ok
    backbone = dino.load_backbone("dinov2_vits14_reg")
    assert backbone.source == str(repo / "snapshots" / "0123abcd")


# ----------------------------------------------------------------------------------------------
# errors: missing, offline, truncated, mismatched


def test_missing_registry_model_names_where_it_looked_and_the_command(tmp_path):
    availability = dino.dino_availability("dinov2_vits14_reg")
    assert not availability.ok
    assert "dinoreg weights download dinov2_vits14_reg" in availability.reason
    assert str(tmp_path / "hf_home" / "hub" / "models--facebook--dinov2-with-registers-small") in availability.reason
    with pytest.raises(InputError) as error:
        dino.load_backbone("dinov2_vits14_reg")
    assert "dinoreg weights download dinov2_vits14_reg" in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_local_checkpoint_names_the_path_and_the_command(tmp_path):
    path = tmp_path / "nowhere" / "dinov2_vits14_reg4_pretrain.pth"
    availability = dino.dino_availability(str(path))
    assert not availability.ok and str(path) in availability.reason
    assert "dinoreg weights download dinov2_vits14_reg" in availability.reason
    with pytest.raises(InputError, match="not found"):
        dino.load_backbone(str(path))


def test_offline_hub_id_not_in_cache_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec, fetch in (("facebook/dinov2-small", "dinov2_vits14"), ("someone/custom-dino", "someone/custom-dino")):
        with pytest.raises(InputError) as error:
            dino.load_backbone(spec)
        message = str(error.value)
        assert "HF_HUB_OFFLINE" in message and f"dinoreg weights download {fetch}" in message and "\n" not in message
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        dino.download_model("dinov2_vits14")


def test_unknown_name_lists_the_registry():
    with pytest.raises(InputError, match="dinov2_vits14_reg"):
        dino.resolve_model("not-a-model")


def test_truncated_checkpoints_give_one_line_errors(model_files, tmp_path):
    _, folder, pth = model_files["dinov2_reg"]
    broken_pth = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    broken_pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated") as error:
        dino.load_backbone(str(broken_pth))
    assert "\n" not in str(error.value) and error.value.__suppress_context__
    broken_folder = tmp_path / "broken_hf"
    shutil.copytree(folder, broken_folder)
    weights_file = broken_folder / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated or corrupted") as error:
        dino.load_backbone(str(broken_folder))
    assert "\n" not in str(error.value)


def test_mismatched_meta_checkpoints_are_rejected(model_files, tmp_path):
    _, _, pth = model_files["dinov2"]
    state = torch.load(pth, weights_only=True)
    cases = {
        "wrong_shape": ({**state, "blocks.1.mlp.fc1.weight": torch.zeros(100, WIDTH)}, "mismatched shapes"),
        "missing_key": ({k: v for k, v in state.items() if k != "blocks.1.ls2.gamma"}, "missing weight 'blocks.1.ls2.gamma'"),
        "unknown_key": ({**state, "head.weight": torch.zeros(3)}, "does not know"),
        "not_dino": ({"fc.weight": torch.zeros(3, 3)}, "not a DINOv2/DINOv3 checkpoint"),
    }
    for name, (bad_state, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad_state, path)
        with pytest.raises(InputError, match=message) as error:
            dino.load_backbone(str(path))
        assert "\n" not in str(error.value)


def test_mismatched_hf_folders_are_rejected(model_files, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, _ = model_files["dinov2"]
    state = load_file(str(folder / "model.safetensors"))
    for name, bad_state, message in (
            ("shape", {**state, "layernorm.weight": torch.zeros(64)}, "do not match the shapes"),
            ("missing", {k: v for k, v in state.items() if k != "encoder.layer.1.norm1.weight"}, "missing")):
        target = tmp_path / name
        shutil.copytree(folder, target)
        save_file(bad_state, str(target / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(InputError, match=message):
            dino.load_backbone(str(target))
    with pytest.raises(InputError, match="give the folder"):
        dino.load_backbone(str(folder / "model.safetensors"))
    not_dino = tmp_path / "vit"
    not_dino.mkdir()
    (not_dino / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (not_dino / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="DINOv2 or DINOv3"):
        dino.load_backbone(str(not_dino))


# ----------------------------------------------------------------------------------------------
# dinoreg weights


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dinoreg")
    add_weights_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_weights_list_verify_clear(model_files, tmp_path, capsys):
    assert run_cli(["weights", "verify"]) == 1  # nothing installed yet
    assert run_cli(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "dinov2_vits14_reg" in listing and "dinov3_vits16" in listing and " yes " not in listing

    _, folder, pth = model_files["dinov2_reg"]
    installed = weights.converted_dir(weights.find_model("dinov2_vits14_reg"))
    shutil.copytree(folder, installed)
    assert run_cli(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith("dinov2_vits14_reg "))
    assert " yes " in row and str(installed) in row

    assert run_cli(["weights", "verify"]) == 0
    assert "dinov2_vits14_reg: OK" in capsys.readouterr().out
    assert run_cli(["weights", "verify", str(pth), str(model_files["dinov3"][1])]) == 0
    assert capsys.readouterr().out.count(": OK") == 2
    assert run_cli(["weights", "verify", "dinov2_vitb14"]) == 1  # not installed: no download, the command
    assert "not downloaded" in (out := capsys.readouterr().out) and "dinoreg weights download dinov2_vitb14" in out
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    assert run_cli(["weights", "verify", str(broken)]) == 1
    assert "FAILED" in capsys.readouterr().out

    assert run_cli(["weights", "clear"]) == 0
    assert not installed.exists() and not dino.dino_availability("dinov2_vits14_reg").ok
    assert run_cli(["weights", "download", "dinov2_vits14"]) == 2  # offline: one line on stderr
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# slice-wise features


def toy_pair(shape=(20, 24, 28)) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocky random volumes; slices k < 5 and k >= 15 are empty in both."""
    torch.manual_seed(0)
    k, j, i = shape
    fixed = torch.zeros(1, 1, k, j, i)
    blocks = torch.rand(1, 1, 3, 4, 4) * 900 + 100
    fixed[:, :, 5:15, 4:20, 4:24] = F.interpolate(blocks, size=(10, 16, 20), mode="nearest")
    moving = torch.roll(fixed, shifts=2, dims=4)
    return fixed, moving


def grid_for(volume: torch.Tensor, spacing=(1.0, 1.0, 1.0)) -> Grid:
    k, j, i = volume.shape[-3:]
    return Grid((i, j, k), spacing=spacing)


def features(model_folder, fixed, moving, grid, masks=(None, None), **params):
    params = {"model": str(model_folder), "token_mm": 2.0, "slice_stride": 1, "pca_channels": 6, **params}
    return dino.dino_feature_pair(fixed, moving, grid, masks[0], masks[1], params, "cpu", Progress())


@pytest.mark.parametrize("kind,axes", [("dinov2_reg", "axial"), ("dinov3", "all")])
def test_feature_pair_shapes(model_files, kind, axes):
    fixed, moving = toy_pair()
    stages = []
    progress = Progress(lambda stage, fraction, left: stages.append((stage, fraction)))
    out = dino.dino_feature_pair(fixed, moving, grid_for(fixed, (1.2, 1.0, 1.5)), None, None,
                                 {"model": str(model_files[kind][1]), "slice_axes": axes, "token_mm": 2.5,
                                  "pca_channels": 5, "slice_stride": 2}, "cpu", progress)
    for features_ in out:
        assert features_.shape == (1, 5, 20, 24, 28) and features_.dtype == torch.float32
        assert torch.isfinite(features_).all()
        assert not features_.is_inference() and not features_.requires_grad
    assert stages[0][0] == "dino features" and stages[-1][0] == "dino features"


def test_pca_is_joint(model_files, monkeypatch):
    folder = model_files["dinov2_reg"][1]
    fixed, moving = toy_pair()
    grid = grid_for(fixed)
    fits = []
    original_fit = JointPCA.fit
    monkeypatch.setattr(JointPCA, "fit", lambda self, n: (fits.append(self.count), original_fit(self, n))[1])
    f_same, m_same = features(folder, fixed, fixed.clone(), grid)
    assert len(fits) == 1
    assert torch.equal(f_same, m_same)  # same image, same basis -> same features
    f_other, _ = features(folder, fixed, moving * 0.5 + torch.rand_like(moving) * 300 * (moving > 0), grid)
    assert not torch.allclose(f_same, f_other, atol=1e-3)  # fixed's features depend on the moving image
    # direct: one basis for both images, fitted on the foreground tokens of both
    pca = JointPCA(3)
    a, b = torch.randn(500, 3) * torch.tensor([5.0, 1.0, 0.1]), torch.randn(500, 3) + 10
    pca.add(a)
    pca.add(b)
    pca.fit(2)
    both = torch.cat([a, b])
    reference = torch.linalg.eigh(torch.cov(both.T, correction=0)).eigenvectors[:, [2, 1]]
    assert torch.allclose(pca.mean, both.mean(0), atol=1e-4)
    assert torch.allclose((pca.basis / pca.basis.norm(dim=0)).abs(), reference.abs(), atol=1e-4)


def test_full_width_features_never_reach_the_voxel_grid(model_files, monkeypatch):
    """Only pca_channels-wide tensors are upsampled to voxel planes (the memory guarantee)."""
    folder = model_files["dinov2"][1]
    fixed, moving = toy_pair()
    planes = {(24, 28), (20, 28), (20, 24)}
    calls = []
    real_interpolate = F.interpolate

    def spy(input, *args, **kwargs):
        output = real_interpolate(input, *args, **kwargs)
        calls.append((output.shape[1], tuple(output.shape[2:])))
        return output

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    monkeypatch.setattr(slicewise.F, "interpolate", spy)
    features(folder, fixed, moving, grid_for(fixed), slice_axes="all", token_mm=3.0)
    to_voxels = [channels for channels, size in calls if len(size) == 2 and
                 any(size[0] <= a and size[1] <= b and size[0] * size[1] >= 0.5 * a * b for a, b in planes)]
    assert to_voxels and max(to_voxels) == 6
    assert any(channels == WIDTH for channels, _ in calls)  # full-width tensors exist, at token resolution only


def test_empty_slices_skipped_and_stride_interpolated(model_files, monkeypatch):
    folder = model_files["dinov2_reg"][1]
    fixed, moving = toy_pair()
    encoded = []
    real_encode = backbones.Backbone.encode
    monkeypatch.setattr(backbones.Backbone, "encode",
                        lambda self, x, dtype=None: (encoded.append(x.shape[0]), real_encode(self, x, dtype))[1])
    features(folder, fixed, moving, grid_for(fixed), slice_stride=1, batch_size=4)
    assert sum(encoded) == 1 + 2 * 10  # one blank + the 10 non-empty axial slices of each image
    encoded.clear()
    f, m = features(folder, fixed, moving, grid_for(fixed), slice_stride=2)
    assert sum(encoded) == 1 + 2 * 6  # slices 5, 7, 9, 11, 13 and the run end 14
    for k in (6, 8, 10, 12):  # skipped slices are the mean of their encoded neighbours
        assert torch.allclose(f[:, :, k], 0.5 * (f[:, :, k - 1] + f[:, :, k + 1]), atol=1e-5)
    assert not torch.allclose(f[:, :, 7], 0.5 * (f[:, :, 6] + f[:, :, 8]), atol=1e-3)
    assert torch.allclose(f[:, :, :5], m[:, :, :5]) and torch.allclose(f[:, :, 15:], m[:, :, 15:])  # blank


def test_masks_define_the_foreground(model_files, monkeypatch):
    folder = model_files["dinov2_reg"][1]
    fixed, moving = toy_pair()
    mask = torch.zeros_like(fixed)
    mask[:, :, 8:11] = 1
    encoded = []
    real_encode = backbones.Backbone.encode
    monkeypatch.setattr(backbones.Backbone, "encode",
                        lambda self, x, dtype=None: (encoded.append(x.shape[0]), real_encode(self, x, dtype))[1])
    features(folder, fixed, moving, grid_for(fixed), masks=(mask, mask))
    assert sum(encoded) == 1 + 2 * 3


def test_slice_schedule_and_interpolation_table():
    counts = np.array([0, 0, 50, 50, 50, 50, 50, 0, 50, 50, 0])
    schedule = slicewise.schedule_slices(counts, plane_voxels=100, stride=3)
    assert schedule.encoded.tolist() == [2, 5, 6, 8, 9]  # stride from 2, ends of the runs [2..6] and [8..9]
    assert schedule.empty.tolist() == [0, 1, 7, 10]
    lower, upper, weight = slicewise.interpolation_table(schedule)
    blank = len(schedule.encoded)
    assert (lower[3], upper[3], weight[3]) == (0, 1, pytest.approx(1 / 3))
    assert (lower[0], upper[0], weight[0]) == (blank, blank, 0.0)
    assert (lower[6], upper[6]) == (2, 2)


def test_replicate_outside_equals_replicate_padding():
    torch.manual_seed(0)
    crop = torch.randn(2, 3, 4, 5)
    box = (slice(1, 4), slice(2, 6), slice(0, 5))
    volume = torch.zeros(2, 6, 9, 5)
    volume[(slice(None), *box)] = crop
    slicewise.replicate_outside(volume, box)
    expected = F.pad(crop[None], (0, 0, 2, 3, 1, 2), mode="replicate")[0]
    assert torch.equal(volume, expected)


def test_axial_axis_follows_the_direction_matrix():
    assert slicewise.slicing_axes(Grid((4, 5, 6)), "axial") == [0]
    sagittal_stack = Grid((4, 5, 6), direction=np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float))
    assert slicewise.slicing_axes(sagittal_stack, "axial") == [1]  # the j axis points S
    assert slicewise.slicing_axes(sagittal_stack, "sagittal") == [0]
    assert slicewise.slicing_axes(sagittal_stack, "all") == [0, 1, 2]


def test_settings_auto_values_and_validation():
    cpu = dino.effective_settings({}, "cpu")
    assert cpu.precision == "fp32" and cpu.token_mm > 0 and cpu.slice_stride >= 1 and cpu.batch_size >= 1
    assert cpu.model == dino.DEFAULT_MODEL == "facebook/dinov2-with-registers-small"
    assert dino.effective_settings({"precision": "bf16", "token_mm": 1.5}, "cpu").token_mm == 1.5
    for bad in ({"slice_axes": "oblique"}, {"precision": "int8"}, {"pca_channels": 0}):
        with pytest.raises(InputError):
            dino.effective_settings(bad, "cpu")


def test_intensity_normalisation_ct_and_mr():
    ct = torch.full((10, 20, 20), -1000.0)
    ct[2:8, 5:15, 5:15] = 40.0
    ct[4, 8, 8] = 1500.0
    assert looks_like_ct(ct)
    normalised = normalise_intensity(ct)
    assert float(normalised.min()) == 0.0 and float(normalised.max()) == 1.0
    assert float(normalised[3, 6, 6]) == pytest.approx(0.52)  # 40 HU in the -1000..1000 window
    mr = torch.rand(10, 20, 20) * 300
    assert not looks_like_ct(mr)
    normalised = normalise_intensity(mr)
    assert 0.0 <= float(normalised.min()) and float(normalised.max()) <= 1.0
    assert float((normalised == 1.0).float().mean()) < 0.02  # only the top 0.5% clip


def test_hub_download_code_path_with_a_local_fixture(model_files, monkeypatch, tmp_path, capsys):
    """The real download code, with the hub replaced by a local folder (no network here)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    folder = model_files["dinov2_reg"][1]
    calls = {}

    def fake_list_repo_files(self, repo_id, **kwargs):
        return ["config.json", "model.safetensors", "pytorch_model.bin", "README.md"]

    def fake_snapshot_download(repo_id, cache_dir=None, allow_patterns=None, **kwargs):
        calls.update(repo_id=repo_id, cache_dir=cache_dir, allow_patterns=allow_patterns)
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, repo / "snapshots" / "feedbeef")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("feedbeef")
        return str(repo / "snapshots" / "feedbeef")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fake_list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert not dino.dino_availability("dinov2_vits14_reg").ok
    assert run_cli(["weights", "download", "dinov2_vits14_reg"]) == 0
    assert calls["repo_id"] == "facebook/dinov2-with-registers-small"
    assert calls["cache_dir"] == str(tmp_path / "hf_home" / "hub")
    assert "*.safetensors" in calls["allow_patterns"] and not any("bin" in p for p in calls["allow_patterns"])
    assert dino.dino_availability("dinov2_vits14_reg").ok
    assert dino.load_backbone("dinov2_vits14_reg").num_prefix_tokens == 5


def test_meta_download_is_converted_into_our_cache(model_files, monkeypatch):
    _, _, pth = model_files["dinov2_reg"]
    urls = []

    def fake_download(url, destination, sha256=None):
        urls.append(url)
        shutil.copy(pth, destination)
        return destination

    monkeypatch.setattr("dinoreg.store.backbones.download_verified", fake_download)
    assert run_cli(["weights", "download", "dinov2_vits14_reg", "--source", "meta"]) == 0
    assert urls == ["https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"]
    converted = weights.converted_dir(weights.find_model("dinov2_vits14_reg"))
    assert (converted / "model.safetensors").is_file()
    backbone = dino.load_backbone("dinov2_vits14_reg")
    assert backbone.source == str(converted)
    x = pixels(14)
    with torch.inference_mode():
        expected = model_files["dinov2_reg"][0](pixel_values=x).last_hidden_state[:, 5:]
    assert torch.allclose(backbone.encode(x), expected, atol=1e-6)
    assert run_cli(["weights", "download", "dinov3_vits16", "--source", "meta"]) == 2  # no public Meta URL
