"""TransMorph and ViT-V-Net reproduce the authors' code exactly (issue 18).

The fixtures ``Testing/fixtures/transmorph_{half,full}.pt`` and ``vitvnet_original.pt`` were made by
``benchmarks/transmorph_reference.py``, which runs the AUTHORS' ``TransMorph.py`` (OASIS and IXI
variants) and ``ViTVNet.py`` (IXI baselines; repository commit in the script) with random values in every tensor at a small size;
here the same state dict (their key names) loads strictly into our module and must give the same
displacement field (< 1e-4 voxel).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dinoreg.networks.transmorph import TRANSMORPH_CONFIG, TransMorph, load_transmorph

FIXTURES = Path(__file__).with_name("fixtures")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def fixture_named(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def fixture(variant: str) -> dict:
    return fixture_named(f"transmorph_{variant}")


def our_config(data: dict) -> dict:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from transmorph_reference import our_config as convert  # lazy: the benchmark script is not a package
    finally:
        sys.path.remove(str(BENCHMARKS))
    return convert(data)


@pytest.mark.parametrize("variant", ["half", "full"])
def test_same_keys_and_shapes_as_the_authors(variant):
    data = fixture(variant)
    ours = {key: tuple(value.shape) for key, value in TransMorph(our_config(data)).state_dict().items()}
    assert ours == {key: tuple(shape) for key, shape in data["keys"].items()}


@pytest.mark.parametrize("variant", ["half", "full"])
def test_field_matches_the_authors_code(variant, tmp_path):
    data = fixture(variant)
    network = TransMorph(our_config(data))
    # the authors' checkpoint layout: a dict with 'state_dict' (and, in theirs, the optimiser and epoch)
    state = {**data["state_dict"], "spatial_trans.grid": network.spatial_trans.grid.clone()}
    path = tmp_path / "dsc0.8000.pth.tar"
    torch.save({"epoch": 3, "state_dict": state, "best_dsc": 0.8, "optimizer": {"state": {}, "param_groups": []}}, path)
    loaded = load_transmorph(str(path), our_config(data))
    with torch.no_grad():
        field = loaded(data["moving"].float(), data["fixed"].float())
    assert field.shape == data["flow"].shape
    assert float(data["flow"].abs().max()) > 1.0  # a real field, not a near-zero one
    assert float((field - data["flow"]).abs().max()) < 1e-4


def test_wrong_checkpoint_is_refused(tmp_path):
    data = fixture("half")
    state = dict(data["state_dict"])
    state.pop("reg_head.0.bias")
    path = tmp_path / "broken.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(RuntimeError, match="reg_head.0.bias"):
        load_transmorph(str(path), our_config(data))


def test_published_config_layout():
    """The real configuration: the authors' 164 tensors; 46.77 M parameters for the IXI variant (the paper's
    Table: TransMorph 46.77 M), the OASIS variant lacks only ``up4``'s and has a 16-channel ``up3``."""
    half, full = TransMorph(), TransMorph({"variant": "full"})
    assert TRANSMORPH_CONFIG["img_size"] == (160, 192, 224)
    assert len(half.state_dict()) == 164
    assert sum(p.numel() for p in full.parameters()) == 46_771_251
    assert sum(p.numel() for p in half.parameters()) == 46_556_979
    assert tuple(half.state_dict()["spatial_trans.grid"].shape) == (1, 3, 160, 192, 224)


def test_unknown_config_and_odd_sizes_refused():
    with pytest.raises(ValueError, match="unknown TransMorph config"):
        TransMorph({"embed": 3})
    network = TransMorph({"embed_dim": 6, "num_heads": (1, 1, 1, 1), "window_size": (2, 2, 2),
                          "img_size": (32, 32, 32)}).eval()
    with pytest.raises(ValueError, match="multiple of 32"):
        network(torch.zeros(1, 1, 32, 32, 48), torch.zeros(1, 1, 32, 32, 48))


def test_method_runs_the_checkpoint_and_returns_the_field_in_physical_units(tmp_path, monkeypatch):
    """The published method ``transmorph`` on images already of the network's size (the authors' setting):
    min-max intensities, the authors' checkpoint file, and fixed voxel p -> moving p + u(p) in mm."""
    import numpy as np

    from dinoreg.core.spatial import grid_points
    from dinoreg.core.transforms import Transform
    from dinoreg.core.volume import Grid, Volume
    from dinoreg.methods.base import RegistrationProblem, get_method
    from dinoreg.methods.published import normalise_minmax
    from dinoreg.store import published

    data = fixture("half")
    cards = published.published_cards()
    card = dict(cards["transmorph"])
    card["config"] = our_config(data)
    monkeypatch.setattr(published, "published_cards", lambda: {**cards, "transmorph": card})
    monkeypatch.setenv("DINOREG_MODELS_DIR", str(tmp_path / "models"))
    network = TransMorph(card["config"]).eval()
    target = published.weights_path("transmorph")
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": {**data["state_dict"], "spatial_trans.grid": network.spatial_trans.grid}}, target)
    network.load_state_dict(torch.load(target, weights_only=True)["state_dict"])

    depth, height, width = card["config"]["img_size"]
    spacing = np.array([1.2, 0.9, 1.5])  # (x, y, z) = (i, j, k) mm
    grid = Grid((width, height, depth), np.array([-10.0, 4.0, 2.0]), spacing)
    moving = Volume(200.0 * data["moving"][0, 0].float().numpy() + 30.0, grid)
    fixed = Volume(500.0 * data["fixed"][0, 0].float().numpy(), grid)
    method = get_method("transmorph")
    assert method.kind == "learned" and method.availability().ok and not method.uses_affine_stage
    transform = method.run(RegistrationProblem(fixed, moving), Transform())

    with torch.no_grad():
        expected = network(normalise_minmax(moving.array)[None, None], normalise_minmax(fixed.array)[None, None])
    expected_mm = expected[0].permute(1, 2, 3, 0).numpy()[..., ::-1] * spacing  # (K, J, I, xyz)
    mapped = transform.mapped_points(fixed.grid).numpy() - grid_points(fixed.grid).numpy()
    assert np.abs(expected_mm).max() > 1.0
    assert np.abs(mapped - expected_mm).max() < 1e-4
    with pytest.raises(Exception, match="unknown parameter"):
        method.run(RegistrationProblem(fixed, moving, params={"io_iterations": 5}), Transform())


def test_card_carries_provenance_licence_and_the_atlas_space_warning(tmp_path, monkeypatch):
    from dinoreg.methods.base import get_method
    from dinoreg.store import find_model, published

    card = published.published_card("transmorph")
    assert card["architecture"] == "transmorph" and card["code"]["commit"] == "6357a1d7fc44c36db9b1d1ccaa372409253142cf"
    assert card["code"]["licence"].startswith("MIT") and card["weights"]["licence"].startswith("unstated")
    assert card["weights"]["url"].startswith("https://drive.google.com/uc?export=download&id=")
    assert "atlas space" in card["preprocessing"]["orientation"]
    assert "not measured here" in card["published_accuracy"]["source"]
    assert "0.762" in card["published_accuracy"]["lumir_note"]
    assert TransMorph(card["config"]).input_shape == (160, 192, 224)
    monkeypatch.setenv("DINOREG_MODELS_DIR", str(tmp_path))
    method = get_method("transmorph")
    assert method.kind == "learned" and method.label.startswith("TransMorph")
    reason = method.availability().reason
    assert "dinoreg models download transmorph" in reason and "about 800 MB" in reason and "licence: unstated" in reason
    assert find_model("transmorph").source == "published"


# ---------------------------------------------------------------------- ViT-V-Net (the authors' IXI baseline)


def test_vitvnet_field_matches_the_authors_code(tmp_path):
    from dinoreg.networks.vitvnet_original import OriginalViTVNet, load_original_vitvnet

    data = fixture_named("vitvnet_original")
    config = our_config(data)
    network = OriginalViTVNet(config)
    ours = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    assert ours == {key: tuple(shape) for key, shape in data["keys"].items()}
    path = tmp_path / "dsc0.7000.pth.tar"
    torch.save({"epoch": 1, "state_dict": {**data["state_dict"], "spatial_trans.grid": network.spatial_trans.grid}},
               path)
    loaded = load_original_vitvnet(str(path), config)
    with torch.no_grad():
        field = loaded(data["moving"].float(), data["fixed"].float())
    assert float(data["flow"].abs().max()) > 1.0
    assert float((field - data["flow"]).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="inputs of size"):
        loaded(torch.zeros(1, 1, 32, 32, 32), torch.zeros(1, 1, 32, 32, 32))


def test_vitvnet_published_config_layout():
    from dinoreg.networks.vitvnet_original import OriginalViTVNet

    network = OriginalViTVNet()
    state = network.state_dict()
    assert tuple(state["transformer.embeddings.position_embeddings"].shape) == (1, 5 * 6 * 7, 252)
    assert tuple(state["decoder.conv_more.0.weight"].shape) == (512, 252, 3, 3, 3)
    assert tuple(state["reg_head.0.weight"].shape) == (3, 16, 3, 3, 3)


def test_vitvnet_method_runs_the_checkpoint(tmp_path, monkeypatch):
    """``vitvnet-ixi`` through the method: the authors' checkpoint file, the field in physical units."""
    import numpy as np

    from dinoreg.core.spatial import grid_points
    from dinoreg.core.transforms import Transform
    from dinoreg.core.volume import Grid, Volume
    from dinoreg.methods.base import RegistrationProblem, get_method
    from dinoreg.methods.published import normalise_minmax
    from dinoreg.networks.vitvnet_original import OriginalViTVNet
    from dinoreg.store import published

    data = fixture_named("vitvnet_original")
    cards = published.published_cards()
    card = dict(cards["vitvnet-ixi"])
    card["config"] = our_config(data)
    assert card["architecture"] == "vitvnet-original" and "atlas" in card["preprocessing"]["orientation"]
    monkeypatch.setattr(published, "published_cards", lambda: {**cards, "vitvnet-ixi": card})
    monkeypatch.setenv("DINOREG_MODELS_DIR", str(tmp_path / "models"))
    network = OriginalViTVNet(card["config"]).eval()
    target = published.weights_path("vitvnet-ixi")
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": {**data["state_dict"], "spatial_trans.grid": network.spatial_trans.grid}}, target)
    network.load_state_dict(torch.load(target, weights_only=True)["state_dict"])

    depth, height, width = card["config"]["img_size"]
    spacing = np.array([1.0, 1.1, 0.8])
    grid = Grid((width, height, depth), np.array([3.0, -4.0, 2.0]), spacing)
    moving = Volume(90.0 * data["moving"][0, 0].float().numpy(), grid)
    fixed = Volume(300.0 * data["fixed"][0, 0].float().numpy() - 20.0, grid)
    transform = get_method("vitvnet-ixi").run(RegistrationProblem(fixed, moving), Transform())
    with torch.no_grad():
        expected = network(normalise_minmax(moving.array)[None, None], normalise_minmax(fixed.array)[None, None])
    expected_mm = expected[0].permute(1, 2, 3, 0).numpy()[..., ::-1] * spacing
    mapped = transform.mapped_points(fixed.grid).numpy() - grid_points(fixed.grid).numpy()
    assert np.abs(expected_mm).max() > 0.5
    assert np.abs(mapped - expected_mm).max() < 1e-4
