"""Model cards: what a checkpoint is, how inputs must be prepared, how it was trained and scored."""

from __future__ import annotations

from typing import Any

CARD_FORMAT = "dinoreg-model/1"
ORIENTATIONS_HELP = "a 3-letter axis code of the array axes i, j, k such as 'RAS' or 'LPS', or 'any'"


def default_preprocessing() -> dict[str, Any]:
    """The preprocessing a card gets when the trainer does not say otherwise."""
    return {"spacing_mm": 2.0, "orientation": "any", "shape_multiple": 1,
            "normalisation": {"kind": "percentile", "low": 0.5, "high": 99.5}}


def orientation_matrix(code: str):
    """LPS direction matrix (columns = directions of the i, j, k axes) of an axis code like 'RAS'."""
    import numpy as np  # lazy: not needed to start this command

    axes = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    code = code.upper()
    if len(code) != 3 or any(c not in axes for c in code) or len({axes[c][0] for c in code}) != 3:
        raise ValueError(f"orientation {code!r} is not {ORIENTATIONS_HELP}")
    matrix = np.zeros((3, 3))
    for column, letter in enumerate(code):
        row, sign = axes[letter]
        matrix[row, column] = sign
    return matrix


def check_card(card: dict[str, Any]) -> list[str]:
    """Problems of a card (empty when it is usable)."""
    problems = []
    for key in ("name", "architecture", "config", "preprocessing"):
        if key not in card:
            problems.append(f"missing '{key}'")
    pre = card.get("preprocessing", {})
    if card.get("published"):  # published networks (models/published.py) resize whole images: no spacing
        return problems
    if not isinstance(pre, dict) or float(pre.get("spacing_mm", 0) or 0) <= 0:
        problems.append("preprocessing.spacing_mm must be a positive number of mm")
    elif str(pre.get("orientation", "any")).lower() != "any":
        try:
            orientation_matrix(str(pre["orientation"]))
        except ValueError as error:
            problems.append(str(error))
    return problems


def card_summary(card: dict[str, Any]) -> str:
    """One line for lists and tooltips: architecture and features, data, resolution, validation Dice."""
    if card.get("published"):
        return published_summary(card)
    features = card.get("features", {}).get("kind", "?")
    training = card.get("training", {}) or {}
    data = training.get("data", "untrained")
    spacing = card.get("preprocessing", {}).get("spacing_mm", "?")
    dice = (card.get("validation", {}) or {}).get("dice")
    dice_text = f"validation Dice {dice:.3f}" if isinstance(dice, (int, float)) else "no validation Dice"
    steps = training.get("steps")
    steps_text = f", {steps} steps" if steps else ""
    return f"{card.get('architecture', '?')} on {features} features; trained on {data}{steps_text}; {spacing} mm; {dice_text}"


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
