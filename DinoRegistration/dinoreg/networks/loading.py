"""A stored trained model as a ready network: the store's files (card + weights, SHA-256 checked)
built into the architecture the card names, and checked to fit it.

The store (``dinoreg.store``) only knows files; building needs the architectures, which live here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dinoreg.errors import InputError
from dinoreg.networks import build_network
from dinoreg.networks.gradicon import load_gradicon
from dinoreg.networks.transmorph import load_transmorph
from dinoreg.networks.vitvnet_original import load_original_vitvnet
from dinoreg.store import card_summary, find_model, locate_model, read_model_files
from dinoreg.store.cards import published_summary
from dinoreg.store.published import published_card, published_weights


def load_model(name_or_path: str | Path, device: str | Any = "cpu") -> tuple[Any, dict[str, Any]]:
    """``(network, card)`` of a registry model name or a model file/stem/folder; network in eval mode.

    Raises a one-line InputError when the card or weights are missing, corrupted (SHA-256), or do
    not fit the architecture the card names.
    """
    _, card_path, _, fix = locate_model(name_or_path)
    state, card, weights_path = read_model_files(name_or_path)
    network = build_from_card(card, card_path)
    expected = network.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(f"model weights '{weights_path}' do not match architecture '{card['architecture']}' of its card "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}): {fix}")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:160]
        raise InputError(f"model weights '{weights_path}' do not match the config in its card ({reason}): {fix}") from None
    return network.to(device).eval(), card


def build_from_card(card: dict[str, Any], card_path: Path) -> torch.nn.Module:
    """The (untrained) network a card describes; InputError naming the card when it cannot be built."""
    try:
        return build_network(str(card["architecture"]), dict(card["config"]))
    except InputError:
        raise
    except ValueError as error:
        raise InputError(f"model card '{card_path}' describes a network that cannot be built ({error}): "
                         "save the model again with this version of dinoreg") from None


def load_published(name: str, device: Any = "cpu", path: str | Path | None = None) -> torch.nn.Module:
    """A published network (uniGradICON family, TransMorph, ViT-V-Net) with its downloaded weights (hash and layout
    checked; the card's ``architecture`` picks the module, its ``config`` configures it)."""
    path = published_weights(name, path)
    card = published_card(name)
    try:
        if card["architecture"] == "transmorph":
            return load_transmorph(str(path), dict(card["config"]), device)
        if card["architecture"] == "vitvnet-original":
            return load_original_vitvnet(str(path), dict(card["config"]), device)
        return load_gradicon(str(path), device)
    except (RuntimeError, ValueError, OSError) as error:
        raise InputError(f"'{path}' is not a {name} weight file ({str(error).splitlines()[0]}): delete it "
                         "('dinoreg models clear') and download it again") from None


def verify_published(name: str) -> str:
    """Load the weights (hashes, layout) and run the network once on a small pair; one-line report."""
    network = load_published(name)
    architecture = published_card(name)["architecture"]
    # a small size each network accepts (ViT-V-Net takes its one input size only)
    shape = {"transmorph": (64, 64, 64), "vitvnet-original": None}.get(architecture, (68, 68, 68)) or network.input_shape
    with torch.no_grad():
        field = network(torch.zeros((1, 1, *shape)), torch.zeros((1, 1, *shape)))
    if not bool(torch.isfinite(field).all()):
        raise InputError(f"model '{name}' produced non-finite values: its weights are damaged")
    return f"{name}: ok ({published_summary(published_card(name))})"


def verify_model(name_or_path: str) -> str:
    """Load a model (hash, card and architecture checked) and run a tiny forward; returns a one-line report."""
    info = find_model(str(name_or_path))
    if info is not None and info.source == "published":
        return verify_published(str(name_or_path))
    network, card = load_model(name_or_path)
    multiple = int(network.shape_multiple)
    side = multiple * max(1, -(-8 // multiple))  # the smallest multiple of the shape rule >= 8 voxels
    with torch.no_grad():
        field = network(torch.zeros((1, 1, side, side, side)), torch.zeros((1, 1, side, side, side)))
    if not bool(torch.isfinite(field).all()):
        raise InputError(f"model '{name_or_path}' produced non-finite values: its weights are damaged")
    return f"{card['name']}: ok ({card_summary(card)})"
