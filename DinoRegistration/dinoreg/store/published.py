"""Published networks of other authors (uniGradICON, multiGradICON), run with their own weight files.

Each has a card in ``models/published/<name>.json`` (shipped with dinoreg: authors, paper, licences,
the weights' official URL, published accuracy). The weights are NOT redistributed: they are fetched
on first use from the authors' URL into ``<models_dir>/<name>/<file>`` (resumable, atomic; checked
against the card's SHA-256, or, where the authors publish none, against the hash recorded at the
first download, and always by loading the state dict strictly into our network).

Cheap: no torch import except in :func:`load_published` and :func:`verify_published`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from dinoreg.errors import InputError

CARDS_DIR = Path(__file__).with_name("published")


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
    from dinoreg.store.networks import models_dir

    return models_dir() / name / str(published_card(name)["weights"]["file"])


def card_path(name: str) -> Path:
    return CARDS_DIR / f"{name}.json"


def download_published(name: str, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Fetch the weights of ``name`` from the authors' URL (no-op when present and intact)."""
    from dinoreg.store.downloads import check_recorded_hash, download_resumable

    card = published_card(name)
    target = weights_path(name)
    if target.is_file():
        check_recorded_hash(target)
        return target
    weights = card["weights"]
    return download_resumable(weights["url"], target, weights.get("sha256"), weights.get("approximate_bytes"),
                              progress)


def load_published(name: str, device: Any = "cpu", path: str | Path | None = None) -> Any:
    """The network of ``name`` with its downloaded weights (hash and state-dict layout checked)."""
    from dinoreg.store.downloads import check_recorded_hash, sha256_of

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
    if card["architecture"] != "gradicon":
        raise InputError(f"published model '{name}' has architecture '{card['architecture']}', which this dinoreg "
                         "cannot run: update dinoreg")
    from dinoreg.networks.gradicon import load_gradicon

    try:
        return load_gradicon(str(path), device)
    except (RuntimeError, ValueError, OSError) as error:
        raise InputError(f"'{path}' is not a {name} weight file ({str(error).splitlines()[0]}): delete it "
                         "('dinoreg models clear') and download it again") from None


def verify_published(name: str) -> str:
    """Load the weights (hashes, layout) and run the network once on a small pair; one-line report."""
    import torch

    network = load_published(name)
    with torch.no_grad():
        field = network(torch.zeros((1, 1, 68, 68, 68)), torch.zeros((1, 1, 68, 68, 68)))
    if not bool(torch.isfinite(field).all()):
        raise InputError(f"model '{name}' produced non-finite values: its weights are damaged")
    return f"{name}: ok ({published_summary(published_card(name))})"


def clear_published(name: str) -> list[Path]:
    """Delete the downloaded files of ``name`` (weights, recorded hash, partial download); returns them."""
    folder = weights_path(name).parent
    removed = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    if removed:
        shutil.rmtree(folder)
    return removed


def published_summary(card: dict[str, Any]) -> str:
    """One line for lists and tooltips: authors' network, modality, published accuracy, download size, licence."""
    accuracy = card.get("published_accuracy", {}) or {}
    dice = accuracy.get("dice")
    if isinstance(dice, (int, float)):
        io = accuracy.get("dice_with_io")
        score = f"published Dice {dice:.3f}" + (f" ({io:.3f} with IO)" if io else "") + f" on {accuracy.get('data')}"
    else:
        score = "no LUMIR Dice published"
    weights = card.get("weights", {})
    size = weights.get("approximate_bytes")
    size_text = f"{size / 1e6:.0f} MB" if size else "size unknown"
    return (f"published {card.get('architecture')} network ({card.get('paper', '?').split(',')[0]}); "
            f"{card.get('modality', '?')}; {score} (not measured here); download {size_text}; "
            f"weights licence {weights.get('licence', 'unstated')}")
