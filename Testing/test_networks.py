"""Every registry network: builds, keeps shapes, starts near the identity, trains, and refuses bad input."""

from __future__ import annotations

import pytest
import torch

from DinoRegistrationLib.geometry import warp
from DinoRegistrationLib.networks import build_network, needs_dino, network_classes
from networks_helpers import TINY_CONFIGS, tiny_dino_folder, tiny_network_spec


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    return tiny_dino_folder(tmp_path_factory.mktemp("dino"))


def test_registry_lists_every_architecture():
    assert set(network_classes()) == {"fmir", "unet", "vitvnet", "dino-vitvnet", "dino-encdec"}
    assert needs_dino("dino-encdec") and needs_dino("fmir", {"backend": "dino"}) and not needs_dino("fmir")
    with pytest.raises(ValueError, match="unknown network"):
        build_network("transmorph")
    with pytest.raises(ValueError, match="unknown unet config keys"):
        build_network("unet", {"encoders": [4]})


@pytest.mark.parametrize("key", sorted(TINY_CONFIGS))
def test_forward_gives_a_field_on_the_input_grid_and_gradients(key, dino_folder):
    torch.manual_seed(0)
    name, config = tiny_network_spec(key, dino_folder)
    network = build_network(name, config)
    multiple = network.shape_multiple
    shape = (2 * multiple, 2 * multiple, 3 * multiple)
    fixed, moving = torch.rand((2, 1, *shape)), torch.rand((2, 1, *shape))
    network.train()
    field = network(fixed, moving)
    assert field.shape == (2, 3, *shape)
    assert float(field.abs().max()) < 0.05  # near-zero initial flow layer: starts at the identity
    loss = (warp(moving, field) - fixed).square().mean() + field.square().mean()
    loss.backward()
    trained = [p for p in network.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    with pytest.raises(ValueError, match="multiples of"):
        network(torch.rand((1, 1, multiple + 1, multiple, multiple)), torch.rand((1, 1, multiple + 1, multiple, multiple)))


def test_frozen_dino_weights_are_not_part_of_the_state_dict(dino_folder):
    network = build_network("dino-vitvnet", {"dino_model": dino_folder, **TINY_CONFIGS["dino-vitvnet"]})
    assert not any("embeddings" in key or "encoder.layer" in key for key in network.state_dict())
    assert network.feature_identity()["hidden_size"] == 32


def test_fmir_channel_subset_while_training_and_stored_basis_at_inference(dino_folder):
    torch.manual_seed(0)
    network = build_network("fmir", {"backend": "dino", "dino_model": dino_folder, **TINY_CONFIGS["fmir-dino"]})
    assert network.raw_channels == 32 and network.channels == 8
    images = torch.rand((1, 1, 8, 8, 12))
    network.eval()
    with pytest.raises(ValueError, match="never fitted"):
        network(images, images)
    samples = network.raw_features(images).flatten(2).transpose(1, 2).reshape(-1, 32)
    network.fit_channel_basis(samples)
    basis = network.state_dict()["channel_basis"]
    assert basis.shape == (8, 32)
    torch.testing.assert_close(basis @ basis.T, torch.eye(8), atol=1e-5, rtol=0)  # orthonormal rows
    with torch.no_grad():
        first, second = network(images, images.flip(2)), network(images, images.flip(2))
    torch.testing.assert_close(first, second)  # inference is deterministic: no per-pair refit, no random subset

