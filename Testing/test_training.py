"""Training: config errors are one line, a short run lowers the loss, resume equals an uninterrupted run,
the exported model round-trips, finetune runs through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoreg.errors import InputError
from dinoreg.training.config import load_config, parse_config

TINY = {
    "seed": 3,
    "network": {"name": "unet", "config": {"encoder": [8, 16, 16], "decoder": [16, 8], "output_level": 1, "integrate_steps": 4}},
    "data": {"source": "random-shapes", "shape": [32, 32, 32], "max_velocity_mm": 6.0},
    "loss": {"lncc": 1.0, "dice": 0.0, "diffusion": 0.05, "lncc_window": 5},
    "optimiser": {"learning_rate": 2e-3},
    "run": {"steps": 40, "log_every": 5, "validate_every": 0, "threads": 1},
}


def tiny_config(**run):
    raw = json.loads(json.dumps(TINY))
    raw["run"].update(run)
    return parse_config(raw, "test")


@pytest.mark.parametrize("text, fragment", [
    ("[run]\nstepz = 3\n", "unknown key 'run.stepz'"),
    ("[optimizer]\nname = 'adam'\n", "unknown section or key 'optimizer'"),
    ("[run]\nsteps = 'many'\n", "'run.steps' must be of type int"),
    ("[data]\nsource = 'pictures'\n", "'data.source' must be one of"),
    ("[run\n", "is not valid TOML"),
    ("[data]\nspacing_mm = 4\nsynthesis_factor = 3\n", "'data.synthesis_factor' = 3 must divide"),
])
def test_config_errors_are_one_line(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError) as error:
        load_config(path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_example_configs_parse():
    folder = Path(__file__).resolve().parent.parent / "configs"
    configs = sorted(folder.glob("*.toml"))
    assert configs, "configs/ holds the example configs"
    for path in configs:
        load_config(path)


def held_out_loss(network, config) -> float:
    """Mean loss of the network on 4 fixed random-shape pairs it never trains on."""
    from dinoreg.data.random_shapes import RandomShapeSettings, random_shape_pair
    from dinoreg.losses import RegistrationLoss

    loss = RegistrationLoss({"lncc": 1.0}, lncc_window=5)
    values = []
    with torch.no_grad():
        for seed in range(4):
            pair = random_shape_pair((32, 32, 32), torch.Generator().manual_seed(10_000 + seed),
                                     RandomShapeSettings(max_velocity_voxels=3.0))
            values.append(float(loss(pair.fixed, pair.moving, network(pair.fixed, pair.moving))))
    return float(np.mean(values))


def test_short_training_lowers_the_loss_and_exports_a_model(tmp_path):
    from dinoreg.store import read_model_files
    from dinoreg.training.networks import build_training_network
    from dinoreg.training.trainer import train

    config = tiny_config()
    torch.manual_seed(config.seed)
    untrained = build_training_network("unet", config.network.config)
    path = train(config, tmp_path / "run", progress_bar=False)
    trained = build_training_network("unet", config.network.config)
    trained.load_state_dict(read_model_files(str(path))[0])
    before, after = held_out_loss(untrained, config), held_out_loss(trained, config)
    assert after < before - 0.02, (before, after)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["architecture"] == "unet" and card["config"]["encoder"] == [8, 16, 16]
    assert card["training"]["steps"] == 40 and card["preprocessing"]["spacing_mm"] == 2.0
    assert {"hardware", "wall_time_s", "data"} <= set(card["training"])
    assert (tmp_path / "run" / "log.csv").read_text().startswith("step,key,value,wall_s")
    with pytest.raises(InputError, match="--resume"):
        train(config, tmp_path / "run", progress_bar=False)


def test_resume_continues_exactly_where_an_interrupted_run_stopped(tmp_path):
    from dinoreg.training.trainer import train

    config = tiny_config(steps=8)
    train(config, tmp_path / "straight", progress_bar=False)

    def interrupt(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    assert train(config, tmp_path / "stopped", progress_bar=False, on_step=interrupt) is None
    state = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5
    train(config, tmp_path / "stopped", resume=True, progress_bar=False)
    from safetensors.torch import load_file

    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name


def test_mean_dice_by_hand():
    from dinoreg.training.validation import mean_dice

    fixed = torch.tensor([1, 1, 2, 2, 0, 3])
    warped = torch.tensor([1, 2, 2, 2, 0, 0])
    # label 1: 2*1/(2+1) = 2/3; label 2: 2*2/(2+3) = 0.8; label 3 absent from warped: skipped
    assert mean_dice(fixed, warped, [1, 2, 3]) == pytest.approx((2 / 3 + 0.8) / 2)


def test_finetune_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOREG_MODELS_DIR", str(tmp_path / "models"))
    import SimpleITK as sitk

    from dinoreg.cli.main import main
    from dinoreg.training.trainer import train

    base = train(tiny_config(steps=2), tmp_path / "base", progress_bar=False)
    (tmp_path / "scans").mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        image = sitk.GetImageFromArray(rng.random((16, 16, 16)).astype(np.float32))
        image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, str(tmp_path / "scans" / f"s{i}.nii.gz"))
    status = main(["finetune", "--model", str(base), "--data", str(tmp_path / "scans"), "--output",
                   str(tmp_path / "tuned"), "--steps", "2", "--quiet", "--device", "cpu", "--name", "my-tuned"])
    assert status == 0
    installed = tmp_path / "models" / "my-tuned.json"
    assert json.loads(installed.read_text())["name"] == "my-tuned"
    from dinoreg.store import find_model

    assert find_model("my-tuned").source == "local" and find_model("my-tuned").present
    card = json.loads((tmp_path / "tuned" / "model.json").read_text())
    assert card["training"]["initialised_from"]["model"] == str(base)
    assert main(["finetune", "--model", str(tmp_path / "nothing.safetensors"), "--data", str(tmp_path / "scans"),
                 "--output", str(tmp_path / "x")]) == 2


def test_fmir_channel_basis_is_fitted_on_training_features(tmp_path):
    from safetensors.torch import load_file

    from dinoreg.training.trainer import train

    raw = json.loads(json.dumps(TINY))
    raw["network"] = {"name": "fmir", "config": {"backend": "mind", "channels": 6, "levels": 2, "head_downsample": 2,
                                                 "context_channels": 4, "context_layers": 1}}
    raw["run"]["steps"] = 2
    path = train(parse_config(raw, "test"), tmp_path / "fmir", progress_bar=False)
    weights = load_file(str(path))
    assert bool(weights["channel_basis_fitted"])
    basis = weights["channel_basis"]
    assert basis.shape == (6, 12) and not torch.allclose(basis, torch.eye(12)[:6])  # a fitted SVD basis
    assert torch.allclose(basis @ basis.T, torch.eye(6), atol=1e-4)  # orthonormal rows


class OnePairSource:
    """A training source that always returns the same labelled random-shape pair (and validates on it)."""

    def __init__(self, shape=(32, 32, 32)):
        from dinoreg.data.random_shapes import RandomShapeSettings, random_shape_pair

        self.pair = random_shape_pair(shape, torch.Generator().manual_seed(1), RandomShapeSettings(max_velocity_voxels=6.0))
        self.label_ids = list(range(16))

    def sample(self, generator):
        return self.pair

    def labelled_pairs(self):
        from dinoreg.training.validation import LabelledPair

        p = self.pair
        return [LabelledPair("one", p.fixed[0, 0].numpy(), p.moving[0, 0].numpy(), p.fixed_labels[0, 0].numpy(),
                             p.moving_labels[0, 0].numpy())]


def test_training_moves_the_field_and_validation_scores_the_network_field(tmp_path, monkeypatch):
    """The wiring from loss to weights to validation (issue 9: a validation Dice constant over 1500
    steps looked like a detached graph or an ignored field): fitted on one pair, the trainer must grow
    the network's displacement, raise that pair's validation Dice, and score exactly the Dice of the
    labels warped by hand through the network's own forward."""
    import dinoreg.training.trainer as trainer_module
    from dinoreg.data.brain_pairs import normalise_foreground
    from dinoreg.core.geometry import warp
    from dinoreg.networks.loading import load_model
    from dinoreg.store import read_model_files
    from dinoreg.training.networks import build_training_network
    from dinoreg.training.trainer import train
    from dinoreg.training.validation import mean_dice

    source = OnePairSource()
    monkeypatch.setattr(trainer_module, "make_source", lambda *args, **kwargs: source)
    raw = json.loads(json.dumps(TINY))
    raw["network"]["config"] = {"encoder": [16, 32, 32], "decoder": [32, 16], "output_level": 1, "integrate_steps": 7}
    raw["data"]["spacing_mm"] = 1.0
    raw["loss"] = {"dice": 1.0, "lncc": 0.3, "diffusion": 0.3, "lncc_window": 3, "dice_downsample": 1}
    raw["run"].update(steps=40, validation="data", validate_every=0)
    path = train(parse_config(raw, "test"), tmp_path / "run", progress_bar=False)

    rows = [line.split(",") for line in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    val = {int(r[0]): float(r[2]) for r in rows if r[1] == "val/dice"}
    assert sorted(val) == [0, 40]
    assert val[40] > val[0] + 0.03, val

    network = build_training_network("unet", raw["network"]["config"])
    network.load_state_dict(read_model_files(str(path))[0])
    network.eval()
    exported, _ = load_model(path)  # what `dinoreg register --method <model.json>` loads
    p = source.pair
    with torch.no_grad():
        field = network(normalise_foreground(p.fixed), normalise_foreground(p.moving))
        assert torch.equal(field, exported(normalise_foreground(p.fixed), normalise_foreground(p.moving)))
    assert float(field.norm(dim=1).mean()) > 0.3  # voxels: the untrained network gives ~1e-4
    by_hand = mean_dice(p.fixed_labels, warp(p.moving_labels, field, mode="nearest"), source.label_ids)
    assert val[40] == pytest.approx(by_hand, abs=1e-6)
