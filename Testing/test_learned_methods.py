"""Learned methods end to end: every registry network through the CLI with tiny random weights saved
as a local model, checkpoints, model management, and physically correct pre/postprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DEMO
from dinoreg.cli.main import main
from dinoreg.errors import InputError
from dinoreg.networks.loading import load_model
from dinoreg.store import save_model
from dinoreg.networks import build_network
from networks_helpers import TINY_CONFIGS, tiny_dino_folder, tiny_network_spec
from test_pipeline import sitk_resample_matches_warped

FIXED, MOVING = DEMO / "MRBrainTumor1.nii.gz", DEMO / "MRBrainTumor2.nii.gz"


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    return tiny_dino_folder(tmp_path_factory.mktemp("dino"))


@pytest.fixture
def models_folder(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("DINOREG_MODELS_DIR", str(folder))
    return folder


def tiny_model(key: str, dino_folder: str | None, seed: int = 0, target_voxels: float = 1.0):
    """A tiny random network whose flow layers are scaled so that it moves a random pair by about
    ``target_voxels`` (at most); 0 gives a network predicting exactly nothing."""
    torch.manual_seed(seed)
    name, config = tiny_network_spec(key, dino_folder)
    network = build_network(name, config).eval()
    if getattr(network, "channels", 0) < getattr(network, "raw_channels", 0):
        samples = network.raw_features(torch.rand((1, 1, 16, 16, 16)))
        network.fit_channel_basis(samples.flatten(2).transpose(1, 2).reshape(-1, network.raw_channels))
    flow_layers = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.out_channels == 3]
    side = 2 * network.shape_multiple
    probe = torch.rand((1, 1, side, side, side)), torch.rand((1, 1, side, side, side))
    with torch.no_grad():
        for layer in flow_layers:
            layer.bias.zero_()
        amplitude = float(network(*probe).abs().max())  # the field is linear in the flow layers' weights
        for layer in flow_layers:
            layer.weight.mul_(target_voxels / amplitude)
    return network


CARD = {"preprocessing": {"spacing_mm": 5.0, "orientation": "any"},
        "training": {"data": "nothing (random weights)", "steps": 0}, "validation": {"dice": None}}


@pytest.mark.parametrize("key", sorted(TINY_CONFIGS))
def test_every_network_registers_the_demo_pair_through_the_cli(key, dino_folder, models_folder, tmp_path):
    network = tiny_model(key, dino_folder)
    save_model(models_folder / f"tiny-{key}", network, CARD)
    outdir = tmp_path / "out"
    assert main(["register", str(FIXED), str(MOVING), "-o", str(outdir), "--method", f"tiny-{key}", "--no-affine",
                 "--no-inverse", "--quiet", "--device", "cpu"]) == 0
    report = json.loads((outdir / "report.json").read_text())
    assert report["method"] == f"tiny-{key}" and report["transform_steps"] == ["DenseField"]
    # the network moved things (not a trivially empty field), and ITK resamples exactly like our warped output
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(outdir / "jacobian.nii.gz")))
    assert float(np.abs(jacobian - 1).max()) > 1e-3
    assert sitk_resample_matches_warped(outdir, FIXED, MOVING) < 0.01


def test_identical_inputs_give_the_identity(models_folder):
    from dinoreg.io.volumes import read_volume
    from dinoreg.app.pipeline import RegistrationOptions, register
    from dinoreg.core.spatial import grid_points

    save_model(models_folder / "tiny-unet", tiny_model("unet", None, target_voxels=2.0), CARD)
    image = read_volume(FIXED)
    result = register(image, image, RegistrationOptions(method="tiny-unet", use_affine=False, compute_inverse=False))
    moved = result.transform.mapped_points(image.grid) - grid_points(image.grid)
    voxels = (moved.numpy() @ np.linalg.inv(image.grid.direction @ np.diag(image.grid.spacing)).T)
    norms = np.linalg.norm(voxels, axis=-1)
    assert norms.mean() < 0.1 and norms.max() < 0.5
    # without the symmetric average the same network does move an image registered to itself
    other = register(image, image, RegistrationOptions(method="tiny-unet", use_affine=False, compute_inverse=False,
                                                       params={"symmetric": "false"}))
    assert float((other.transform.mapped_points(image.grid) - grid_points(image.grid)).abs().max()) > 0.5


def test_checkpoint_round_trips_to_identical_outputs(dino_folder, tmp_path):
    network = tiny_model("fmir-dino", dino_folder)
    card_path = save_model(tmp_path / "fmir.v2", network, {"name": "round-trip", **CARD})
    assert card_path.name == "fmir.v2.json" and (tmp_path / "fmir.v2.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmir.v2.json", "fmir.v2.safetensors"]  # no leftovers
    loaded, card = load_model(tmp_path / "fmir.v2")
    images = torch.rand((2, 1, 8, 8, 12)), torch.rand((2, 1, 8, 8, 12))
    with torch.no_grad():
        assert torch.equal(network(*images), loaded(*images))
    assert card["architecture"] == "fmir" and card["features"]["kind"] == "dino"
    assert len(card["features"]["weights_sha256"]) == 64  # identity of the frozen DINO weights
    assert card["preprocessing"]["shape_multiple"] == network.shape_multiple
    assert {"channel_basis", "channel_basis_fitted"} <= set(loaded.state_dict())
    for key in ("engine_version", "weights_sha256", "weights_bytes", "training", "validation"):
        assert key in card


def one_line_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_corrupted_or_mismatched_checkpoints_give_one_line_errors(models_folder, tmp_path, capsys):
    save_model(models_folder / "broken", tiny_model("unet", None), CARD)
    weights = models_folder / "broken.safetensors"
    args = ["register", str(FIXED), str(MOVING), "-o", str(tmp_path / "out"), "--method", "broken", "--no-affine", "--quiet"]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(args) == 2
    line = one_line_error(capsys)
    assert "broken.safetensors" in line and "corrupted" in line and "save or copy" in line
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated, and its card updated to match the hash
    card = json.loads((models_folder / "broken.json").read_text())
    from dinoreg.store import sha256_of

    card["weights_sha256"] = sha256_of(weights)
    (models_folder / "broken.json").write_text(json.dumps(card))
    assert main(args) == 2
    assert "cannot read model weights" in one_line_error(capsys)
    # weights of another configuration under this card
    save_model(tmp_path / "other", build_network("unet", {"encoder": [4, 4, 4], "decoder": [4, 4]}), CARD)
    (tmp_path / "other.safetensors").replace(weights)
    card["weights_sha256"] = sha256_of(weights)
    (models_folder / "broken.json").write_text(json.dumps(card))
    assert main(args) == 2
    assert "do not match" in one_line_error(capsys)
    weights.unlink()
    assert main(args) == 2
    assert "not installed" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_foreign_pth_is_read_with_weights_only(tmp_path):
    network = tiny_model("unet", None)
    save_model(tmp_path / "model", network, CARD)
    torch.save({"state_dict": network.state_dict()}, tmp_path / "model.pth")
    (tmp_path / "model.safetensors").unlink()
    loaded, _ = load_model(tmp_path / "model.pth")
    images = torch.rand((1, 1, 8, 8, 8)), torch.rand((1, 1, 8, 8, 8))
    with torch.no_grad():
        assert torch.equal(network(*images), loaded(*images))

    class Payload:  # a pickle that would run code is refused
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"weights": Payload()}, tmp_path / "model.pth")
    with pytest.raises(InputError, match="cannot read model weights"):
        load_model(tmp_path / "model.pth")


def constant_translation_model(voxels_dhw) -> torch.nn.Module:
    """A U-Net whose output is exactly a constant displacement (model-grid voxels, channels D, H, W)."""
    network = build_network("unet", {"encoder": [4], "decoder": [4], "output_level": 0})
    with torch.no_grad():
        network.flow.weight.zero_()
        network.flow.bias.copy_(torch.tensor(voxels_dhw, dtype=torch.float32))
    return network


def test_oblique_anisotropic_input_gives_a_physically_correct_field(models_folder, tmp_path):
    """Model grid in RAS at 4 mm, fixed oblique and anisotropic: a known model-grid translation must
    come out as the same physical translation in the exported ITK transform."""
    source = sitk.ReadImage(str(FIXED))
    rotation = sitk.VersorTransform((0.3, 0.2, 0.9), 0.5)  # an oblique direction
    direction = np.array(rotation.GetMatrix()).reshape(3, 3)
    reference = sitk.Image([40, 44, 18], sitk.sitkFloat32)
    reference.SetSpacing((4.5, 4.0, 7.0))
    reference.SetDirection(direction.ravel().tolist())
    centre = np.array(source.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in source.GetSize()]))
    reference.SetOrigin((centre - direction @ (np.array([4.5, 4.0, 7.0]) * (np.array([40, 44, 18]) - 1) / 2)).tolist())
    oblique = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sitk.WriteImage(oblique, str(tmp_path / "oblique.nii.gz"))
    card = {"preprocessing": {"spacing_mm": 4.0, "orientation": "RAS"}}
    save_model(models_folder / "shift", constant_translation_model((2.0, -1.0, 0.5)), card)
    outdir = tmp_path / "out"
    assert main(["register", str(tmp_path / "oblique.nii.gz"), str(FIXED), "-o", str(outdir), "--method", "shift",
                 "--no-affine", "--param", "symmetric=false", "--quiet"]) == 0
    # RAS model grid: i -> R (LPS -x), j -> A (LPS -y), k -> S (LPS +z); channels (dk, dj, di) = (2, -1, 0.5) voxels
    expected = np.array([-0.5 * 4.0, 1.0 * 4.0, 2.0 * 4.0])
    transform = sitk.ReadTransform(str(outdir / "transform.h5"))
    rng = np.random.default_rng(1)
    for _ in range(20):
        index = rng.uniform(0.2, 0.8, 3) * (np.array(oblique.GetSize()) - 1)
        point = np.array(oblique.TransformContinuousIndexToPhysicalPoint(index.tolist()))
        np.testing.assert_allclose(np.array(transform.TransformPoint(point.tolist())) - point, expected, atol=1e-3)
    assert sitk_resample_matches_warped(outdir, tmp_path / "oblique.nii.gz", FIXED) < 0.01


def test_io_preset_improves_on_the_network(models_folder, tmp_path):
    from dinoreg.io.volumes import read_volume
    from dinoreg.app.pipeline import RegistrationOptions, register

    save_model(models_folder / "tiny-unet", tiny_model("unet", None, target_voxels=0.0), CARD)
    fixed, moving = read_volume(FIXED), read_volume(MOVING)
    plain = register(fixed, moving, RegistrationOptions(method="tiny-unet", use_affine=False, compute_inverse=False))
    for similarity, io_spacing in (("mind", "2"), ("mind", "0"), ("lncc", "2")):  # 0: on the 5 mm model grid
        params = {"io_similarity": similarity, "io_iterations": "20", "io_spacing_mm": io_spacing}
        refined = register(fixed, moving, RegistrationOptions(method="tiny-unet", preset="io", use_affine=False,
                                                              compute_inverse=False, params=params))
        assert refined.report["similarity_after"]["ncc"] > plain.report["similarity_after"]["ncc"] + 0.02
        assert refined.report["jacobian"]["percent_nonpositive"] < 1.0


def test_methods_json_lists_learned_methods_with_weight_status(models_folder, monkeypatch, tmp_path, capsys):
    from dinoreg.store import networks as model_registry

    save_model(models_folder / "tiny-local", tiny_model("unet", None), CARD)
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps({"models": [{"name": "remote-net", "architecture": "unet", "source": "download",
                                                     "url": "https://example.invalid/remote-net.safetensors",
                                                     "card_url": "https://example.invalid/remote-net.json",
                                                     "sha256": "0" * 64, "size": 1000}]}))
    monkeypatch.setattr(model_registry, "REGISTRY_FILE", registry_file)
    assert main(["methods", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    local, remote = rows["tiny-local"], rows["remote-net"]
    assert local["kind"] == "learned" and local["available"] and local["weights"]["source"] == "local"
    assert local["weights"]["present"] and len(local["weights"]["sha256"]) == 64
    assert "io" in local["presets"] and "5.0 mm" in local["card"]
    assert remote["kind"] == "learned" and not remote["available"] and not remote["weights"]["present"]
    assert "dinoreg models download remote-net" in remote["reason"]
    assert rows["mind-zeroshot"]["kind"] == "zero-shot" and rows["affine"]["kind"] == "baseline"
    for row in rows.values():
        assert {"name", "label", "kind", "rank", "available", "reason", "presets", "default_preset"} <= set(row)
    # models list / verify / clear
    assert main(["models", "list", "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed["tiny-local"]["present"] and not listed["remote-net"]["present"]
    assert main(["models", "verify"]) == 0
    assert "tiny-local: ok" in capsys.readouterr().out
    assert main(["models", "clear", "--local"]) == 0
    assert "deleted 2 file(s)" in capsys.readouterr().out
    assert not (models_folder / "tiny-local.safetensors").exists()
    # a model that disappeared is no longer a method
    assert main(["methods", "--json"]) == 0
    assert "tiny-local" not in {row["name"] for row in json.loads(capsys.readouterr().out)}


def test_shipped_and_downloaded_models(models_folder, monkeypatch, tmp_path, capsys):
    """A shipped model (files next to the registry) is a method with no download; a downloadable one is
    fetched, checked against its SHA-256, and refused when the hash differs (nothing left behind)."""
    from dinoreg.store import download_model, registry_entry
    from dinoreg.store import networks as model_registry

    shipped_dir, remote = tmp_path / "shipped", tmp_path / "remote"
    shipped_card = save_model(shipped_dir / "ship-net", tiny_model("unet", None), CARD)
    remote_card = save_model(remote / "far-net", tiny_model("vitvnet", None), CARD)
    far = registry_entry(remote_card, "download", (remote / "far-net.safetensors").as_uri(), remote_card.as_uri())
    (remote / "bad-net.json").write_text(remote_card.read_text())
    bad = dict(far, name="bad-net", sha256="1" * 64, url=(remote / "bad-net.safetensors").as_uri(),
               card_url=(remote / "bad-net.json").as_uri())
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps({"models": [registry_entry(shipped_card), far, bad]}))
    monkeypatch.setattr(model_registry, "REGISTRY_FILE", registry_file)
    monkeypatch.setattr(model_registry, "SHIPPED_DIR", shipped_dir)
    assert main(["methods", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["ship-net"]["available"] and rows["ship-net"]["weights"]["source"] == "shipped"
    assert not rows["far-net"]["available"] and rows["far-net"]["weights"]["source"] == "download"
    assert main(["register", str(FIXED), str(MOVING), "-o", str(tmp_path / "out"), "--method", "ship-net",
                 "--no-affine", "--quiet"]) == 0
    assert download_model("far-net") == models_folder / "far-net.json"
    assert (models_folder / "far-net.safetensors").is_file()
    assert main(["methods", "--json"]) == 0
    assert {row["name"]: row for row in json.loads(capsys.readouterr().out)}["far-net"]["available"]
    (remote / "bad-net.safetensors").write_bytes((remote / "far-net.safetensors").read_bytes())
    with pytest.raises(InputError, match="SHA-256"):
        download_model("bad-net")
    assert sorted(p.name for p in models_folder.iterdir()) == ["far-net.json", "far-net.safetensors"]
    assert main(["models", "clear"]) == 0
    assert not any(models_folder.iterdir()) and shipped_card.is_file()


def test_models_shipped_in_the_repository_verify():
    """Every model listed as shipped in the real registry is present and passes its hash and a forward."""
    from dinoreg.networks.loading import verify_model
    from dinoreg.store import list_models

    shipped = [info for info in list_models() if info.source == "shipped"]
    if not shipped:
        pytest.skip("no model is shipped yet")
    for info in shipped:
        assert info.present, f"{info.weights_path} is missing"
        assert "ok" in verify_model(info.name)


def test_masks_make_the_result_ignore_everything_outside_them(models_folder):
    from dinoreg.io.volumes import read_volume
    from dinoreg.app.pipeline import RegistrationOptions, register

    save_model(models_folder / "tiny-unet", tiny_model("unet", None, target_voxels=2.0), CARD)
    fixed, moving = read_volume(FIXED), read_volume(MOVING)

    def box_mask(volume, margin):
        array = np.zeros(volume.array.shape, dtype=np.uint8)
        array[margin:-margin, margin:-margin, margin:-margin] = 1
        return volume.with_array(array)

    fixed_mask, moving_mask = box_mask(fixed, 6), box_mask(moving, 6)
    noisy = moving.array.astype(np.float32).copy()
    outside = box_mask(moving, 4).array == 0  # changed only 2 voxels away from the mask
    noisy[outside] = np.random.default_rng(0).uniform(0, 3 * noisy.max(), outside.sum())
    options = RegistrationOptions(method="tiny-unet", preset="io", use_affine=False, compute_inverse=False,
                                  params={"io_iterations": "5"})
    first = register(fixed, moving, options, fixed_mask, moving_mask)
    second = register(fixed, moving.with_array(noisy), options, fixed_mask, moving_mask)
    np.testing.assert_allclose(first.transform.dense.displacement, second.transform.dense.displacement, atol=1e-4)
    unmasked = register(fixed, moving.with_array(noisy), options)
    assert np.abs(unmasked.transform.dense.displacement - first.transform.dense.displacement).max() > 0.1


def test_antialiasing_before_a_coarse_model_grid_matches_average_pooling():
    """A 1 mm noise image brought to a 4 mm model grid: smoothed first, its spread matches average
    pooling by 4 (std / 8 for white noise, within 35 %), not point sampling (the full std)."""
    from dinoreg.methods.learned import antialiased
    from dinoreg.core.volume import Volume

    rng = np.random.default_rng(0)
    noise = Volume.from_array_ras(rng.standard_normal((64, 64, 64)).astype(np.float32))  # 1 mm
    smoothed = antialiased(noise, 4.0).array
    pooled_std = noise.array.reshape(16, 4, 16, 4, 16, 4).mean(axis=(1, 3, 5)).std()
    sampled_std = smoothed[8:-8:4, 8:-8:4, 8:-8:4].std()
    assert 0.65 * pooled_std < sampled_std < 1.35 * pooled_std
    assert np.array_equal(antialiased(noise, 1.0).array, noise.array)  # not coarser: unchanged


def test_field_on_grid_resamples_a_model_field_onto_the_finer_io_grid():
    """A displacement of (1, 2, 3) voxels on a 4 mm grid is (2, 4, 6) voxels of a 2 mm grid over the
    same box, and a field growing along one axis keeps its physical values at the target points."""
    import torch

    from dinoreg.methods.learned import field_on_grid
    from dinoreg.core.volume import Grid

    coarse = Grid((10, 12, 14), np.zeros(3), np.full(3, 4.0), np.eye(3))
    fine = Grid((19, 23, 27), np.zeros(3), np.full(3, 2.0), np.eye(3))
    constant = torch.tensor([3.0, 2.0, 1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 14, 12, 10).contiguous()  # (dk, dj, di)
    resampled = field_on_grid(constant, coarse, fine)
    assert resampled.shape == (1, 3, 27, 23, 19)
    assert torch.allclose(resampled[0, :, 2:-2, 2:-2, 2:-2].mean(dim=(1, 2, 3)), torch.tensor([6.0, 4.0, 2.0]), atol=1e-5)
    x_mm = torch.arange(10, dtype=torch.float32) * 4.0  # di grows with x: di = 0.1 * x_mm / 4 voxels
    growing = torch.zeros(1, 3, 14, 12, 10)
    growing[0, 2] = (0.1 * x_mm / 4.0).view(1, 1, 10)
    fine_x_mm = torch.arange(19, dtype=torch.float32) * 2.0
    assert torch.allclose(field_on_grid(growing, coarse, fine)[0, 2, 5, 5], (0.1 * fine_x_mm / 2.0).view(1, 19), atol=1e-5)
