"""Published networks of other authors (uniGradICON, multiGradICON, TransMorph, ViT-V-Net), run with their own weight files.

Each has a card in ``models/published/<name>.json`` (shipped with dinoreg: authors, paper, licences,
the weights' official URL, published accuracy). The weights are NOT redistributed: they are fetched
on first use from the authors' URL into ``<models_dir>/<name>/<file>`` (resumable, atomic; checked
against the card's SHA-256, or, where the authors publish none, against the hash recorded at the
first download, and always by loading the state dict strictly into our network).

Cheap: no torch import (the network is built in ``dinoreg.networks.loading``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from dinoreg.errors import InputError
from dinoreg.store.downloads import check_recorded_hash, download_resumable, sha256_of
from dinoreg.store.locations import models_dir

CARDS_DIR = Path(__file__).with_name("published")
#: architectures ``dinoreg.networks.loading.load_published`` builds (``networks/gradicon.py``, ``networks/transmorph.py``)
ARCHITECTURES = ("gradicon", "transmorph", "vitvnet-original")


def published_cards() -> dict[str, dict[str, Any]]:
    """Every published model's card by name (read from the shipped JSON files)."""
    cards = {}
    for path in sorted(CARDS_DIR.glob("*.json")):
        card = json.loads(path.read_text())
        cards[card["name"]] = card
    return cards


def published_card(name: str) -> dict[str, Any]:
    cards = published_cards()
    if name not in cards:
        raise InputError(f"unknown published model '{name}': choose one of {sorted(cards)}")
    return cards[name]


def weights_path(name: str) -> Path:
    """Where the weight file of ``name`` lives once downloaded (``<models_dir>/<name>/<file>``)."""
    return models_dir() / name / str(published_card(name)["weights"]["file"])


def card_path(name: str) -> Path:
    return CARDS_DIR / f"{name}.json"


def download_published(name: str, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Fetch the weights of ``name`` from the authors' URL (no-op when present and intact)."""

    card = published_card(name)
    target = weights_path(name)
    if target.is_file():
        check_recorded_hash(target)
        return target
    weights = card["weights"]
    return download_resumable(weights["url"], target, weights.get("sha256"), weights.get("approximate_bytes"),
                              progress)


def published_weights(name: str, path: str | Path | None = None) -> Path:
    """The downloaded weight file of ``name``, its SHA-256 checked (the card's, else the one recorded at
    first download) and its architecture one this dinoreg runs; building the network is
    ``dinoreg.networks.loading.load_published``."""
    card = published_card(name)
    path = Path(path) if path is not None else weights_path(name)
    if not path.is_file():
        raise InputError(f"the weights of '{name}' are not downloaded: run 'dinoreg models download {name}' "
                         f"(about {card['weights']['approximate_bytes'] / 1e6:.0f} MB from {card['weights']['url']})")
    expected = card["weights"].get("sha256")
    if expected and sha256_of(path) != expected:
        raise InputError(f"'{path}' does not match the SHA-256 of {name}: delete it ('dinoreg models clear') and "
                         "download it again")
    check_recorded_hash(path)
    if card["architecture"] not in ARCHITECTURES:
        raise InputError(f"published model '{name}' has architecture '{card['architecture']}', which this dinoreg "
                         "cannot run: update dinoreg")
    return path


def clear_published(name: str) -> list[Path]:
    """Delete the downloaded files of ``name`` (weights, recorded hash, partial download); returns them."""
    folder = weights_path(name).parent
    removed = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    if removed:
        shutil.rmtree(folder)
    return removed
