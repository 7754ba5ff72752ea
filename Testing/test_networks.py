"""Every registry network: builds, keeps shapes, starts near the identity, trains, and refuses bad input."""

from __future__ import annotations

import pytest
import torch

from dinoreg.core.geometry import warp
from dinoreg.networks import build_network, needs_dino, network_classes
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
    network.train()
    subsets = []
    original = network.reduce_channels
    network.reduce_channels = lambda features, subset: subsets.append(subset) or original(features, subset)
    network(images, images.flip(2))
    network(images, images.flip(2))
    assert all(s is not None and s.numel() == 8 for s in subsets)  # a random subset of 8 of the 32 channels
    assert not torch.equal(subsets[0], subsets[2])  # drawn anew at every step (same for fixed and moving)
    assert torch.equal(subsets[0], subsets[1])



def test_cpu_convolution_fast_path_equals_torch():
    from dinoreg.networks.blocks import Conv3d

    torch.manual_seed(0)
    for stride, in_channels in ((1, 8), (2, 2)):
        fast = Conv3d(in_channels, 3, 3, stride=stride, padding=1)
        reference = torch.nn.Conv3d(in_channels, 3, 3, stride=stride, padding=1)
        reference.load_state_dict(fast.state_dict())
        x = torch.rand((1, in_channels, 10, 12, 14), requires_grad=True)
        torch.testing.assert_close(fast(x), reference(x), atol=1e-5, rtol=1e-5)
        fast(x).sum().backward()
        assert fast.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("key", ["fmir", "unet"])
def test_symmetric_forward_is_the_antisymmetric_average(key):
    torch.manual_seed(0)
    network = build_network(*tiny_network_spec(key, None)).eval()
    if network.name == "fmir":
        network.fit_channel_basis(torch.rand((100, 12)))
    for module in network.modules():
        if isinstance(module, torch.nn.Conv3d) and module.out_channels == 3:
            torch.nn.init.normal_(module.weight, 0.0, 0.1)
    side = 2 * network.shape_multiple
    fixed, moving = torch.rand((1, 1, side, side, side)), torch.rand((1, 1, side, side, side))
    with torch.no_grad():
        expected = 0.5 * (network(fixed, moving) - network(moving, fixed))
        symmetric = network.symmetric_forward(fixed, moving)
        torch.testing.assert_close(symmetric, expected, atol=1e-5, rtol=1e-4)
        assert float(symmetric.abs().max()) > 1e-3
        assert float(network.symmetric_forward(fixed, fixed).abs().max()) == 0.0
        torch.testing.assert_close(network.symmetric_forward(moving, fixed), -symmetric)
