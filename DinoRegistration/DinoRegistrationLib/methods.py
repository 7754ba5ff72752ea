"""What the panel's Method and Preset lists show, built from ``dinoreg methods --json``.

Each method entry may carry (from the networks work) ``label``, ``kind`` (baseline | zero-shot |
learned), ``rank`` (order of recommendation), ``weights`` {source, present, path, sha256, size_mb}
and ``card`` (one-line model card); older engines give only ``name``, ``summary``, ``available``,
``reason``, ``presets``, ``default_preset`` and ``parameters``. Every missing field has a fallback,
so the panel works with both. Pure Python: tested headless.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

#: presets offered first, in this order, for every method that has them (and for Automatic)
PRESETS: Tuple[Tuple[str, str], ...] = (("brain-mr", "Brain MR"), ("body-ct", "Body CT"), ("fast", "Fast"),
                                        ("accurate", "Accurate"))
DEFAULT_PRESET = "brain-mr"
#: fallbacks for engines whose method list has no label / kind / rank
FALLBACK_LABELS = {"dino-mind": "DINOv2 + MIND features", "dino-zeroshot": "DINOv2 features",
                   "mind-zeroshot": "MIND features (no model needed)", "affine": "Affine only",
                   "identity": "Identity (no registration)"}
FALLBACK_RANK = ("dino-mind", "dino-zeroshot", "mind-zeroshot")  # the engine's 'auto' order
FALLBACK_BASELINES = ("identity", "affine")
#: panel setting -> method parameter names it may correspond to (the first one the method has is used)
ADVANCED_PARAMETERS = {
    "featureModel": ("model", "feature_model", "backbone", "dino_model"),
    "regularisation": ("regularisation", "regularization", "smoothness", "lambda_reg", "alpha"),
    "iterations": ("iterations", "adam_iterations", "instance_iterations", "iters"),
    "inverseConsistent": ("inverse_consistent",),
}


def label(method: Dict[str, Any]) -> str:
    return str(method.get("label") or FALLBACK_LABELS.get(method.get("name", ""), method.get("name", "?")))


def isBaseline(method: Dict[str, Any]) -> bool:
    kind = method.get("kind")
    return kind == "baseline" if kind else method.get("name") in FALLBACK_BASELINES


def rankKey(method: Dict[str, Any]) -> Tuple[float, str]:
    rank = method.get("rank")
    if isinstance(rank, (int, float)):
        return float(rank), method.get("name", "")
    name = method.get("name", "")
    return float(FALLBACK_RANK.index(name) if name in FALLBACK_RANK else len(FALLBACK_RANK) + 1), name


def shownMethods(methods: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The methods the list offers: baselines hidden, in order of recommendation."""
    return sorted((m for m in methods if not isBaseline(m)), key=rankKey)


def shortReason(method: Dict[str, Any]) -> str:
    """Why a method cannot run, in one line (the full reason goes in a tooltip)."""
    weights = method.get("weights") or {}
    if weights and not weights.get("present", True):
        size = weights.get("size_mb")
        return f"{label(method)} weights{f' ({size:.0f} MB)' if isinstance(size, (int, float)) else ''} not downloaded yet"
    reason = str(method.get("reason") or "").strip()
    if "not downloaded" in reason:  # today's engine: 'DINO model X is not downloaded: looked in ...'
        return "DINO weights not downloaded yet"
    first = reason.split(":")[0].split(". ")[0].strip()
    return first[:90] or "cannot run here"


def needsWeights(method: Dict[str, Any]) -> bool:
    weights = method.get("weights") or {}
    if weights:
        return not weights.get("present", True) and weights.get("source", "download") in ("download", "published")
    return "weights download" in str(method.get("reason", ""))


def automaticLabel(methods: List[Dict[str, Any]]) -> str:
    """'Automatic: <method that will run> (<why not a better one>)', e.g.
    'Automatic: MIND zero-shot (DINO weights not downloaded yet)'."""
    ranked = shownMethods(methods)
    chosen = next((m for m in ranked if m.get("available", True)), None)
    if chosen is None:
        return "Automatic (no method can run here yet)"
    better = [m for m in ranked if rankKey(m) < rankKey(chosen)]
    text = f"Automatic: {label(chosen)}"  # the plain label the list shows, not the internal name
    return text + (f" ({shortReason(better[0])})" if better else "")


def methodItems(methods: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Items of the Method list after 'Automatic': ``{"text", "data", "toolTip", "available"}``."""
    items = []
    for method in shownMethods(methods):
        available = bool(method.get("available", True))
        tip = str(method.get("card") or method.get("summary") or "")
        if not available:
            tip = (tip + "\n\n" if tip else "") + f"Cannot run here: {method.get('reason', '')}"
        items.append({"text": label(method) if available else f"{label(method)} (unavailable)",
                      "data": method.get("name", ""), "toolTip": tip, "available": available})
    return items


def presetItems(method: Optional[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(label, preset name) of the Preset list: the common presets first (all of them for Automatic), then
    the method's own (e.g. a learned model's 'io'); 'default' is not offered, it duplicates Brain MR."""
    if method is None:
        return [(text, name) for name, text in PRESETS]
    own = [p for p in method.get("presets", []) if p != "default"]
    items = [(text, name) for name, text in PRESETS if name in own]
    items += [(name.replace("-", " ").capitalize() if len(name) > 3 else name.upper(), name)
              for name in own if name not in dict(PRESETS)]
    return items


def presetFor(method: Optional[Dict[str, Any]], wanted: str) -> str:
    """``wanted`` if the method has it, else the method's default (or its first preset; '' if it has none)."""
    names = [name for _, name in presetItems(method)]
    if wanted in names:
        return wanted
    default = (method or {}).get("default_preset", "")
    if default in names:
        return default
    return names[0] if names else ""


def methodParameterKey(method: Optional[Dict[str, Any]], setting: str) -> Optional[str]:
    """Name of the method's parameter behind a panel setting, or None if the method has none."""
    parameters = (method or {}).get("parameters") or {}
    return next((key for key in ADVANCED_PARAMETERS[setting] if key in parameters), None)


def weightsNameFromReason(reason: str) -> Optional[str]:
    """The NAME in a reason such as '... run: dinoreg weights download NAME'."""
    words = reason.replace("'", " ").replace('"', " ").replace("`", " ").split()
    for index, word in enumerate(words[:-1]):
        if word == "download" and index > 0 and words[index - 1] == "weights":
            return words[index + 1].rstrip(".,;:)")
    return None


def isNetworkDownload(method: Dict[str, Any]) -> bool:
    """True for a trained or published network whose weights ``dinoreg models download`` fetches (its name is the method's)."""
    weights = method.get("weights") or {}
    return bool(weights) and weights.get("source") in ("download", "published")


def weightsName(method: Dict[str, Any]) -> Optional[str]:
    """What ``dinoreg weights download`` (DINO backbones) or, for networks, ``dinoreg models download`` must fetch."""
    if isNetworkDownload(method):
        return str(method.get("name") or "") or None
    name = weightsNameFromReason(str(method.get("reason", "")))
    if name:
        return name
    key = methodParameterKey(method, "featureModel")
    return str(method["parameters"][key]) if key else None
