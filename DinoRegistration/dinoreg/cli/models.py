"""``dinoreg models list|download|verify|clear`` and the per-method fields of ``dinoreg methods --json``.

Kept out of ``cli.py`` so the main CLI stays thin: it calls :func:`add_models_command` with its
sub-parsers and merges :func:`method_listing` into each row of the methods listing.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dinoreg.errors import InputError
from dinoreg.progress import done_event, print_event, progress_event


def method_listing(method: Any) -> dict[str, Any]:
    """``kind``, ``label``, ``rank`` of any method; plus ``weights`` and ``card`` for learned ones.

    ``weights``: ``{source: shipped|download|local, present, path, sha256}``; ``card``: one line
    (architecture, features, training data, resolution, validation Dice).
    """
    from dinoreg.store import card_summary  # lazy: not needed to start dinoreg

    row: dict[str, Any] = {"kind": method.kind, "label": method.label or method.name, "rank": int(method.rank)}
    info = getattr(method, "model_info", None)
    if info is not None:
        row["weights"] = {"source": info.source, "present": info.present, "path": str(info.weights_path),
                          "sha256": info.sha256}
        if info.size:
            row["weights"]["size_mb"] = round(info.size / 1e6, 1)
        card = method.card()
        row["card"] = card_summary(card) if card else "model card not installed"
    return row


def add_models_command(sub: Any) -> None:
    """Add ``dinoreg models`` with its actions to the main parser's sub-parsers."""
    models = sub.add_parser("models", help="list, download, verify or clear trained registration models",
                            description="Trained registration models: shipped with dinoreg, downloadable (checked "
                                        "against SHA-256) or local (in $DINOREG_MODELS_DIR, default "
                                        "~/.cache/dinoreg/models).")
    actions = models.add_subparsers(dest="models_action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="every known model, its source, whether present, and its card")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=list_handler)
    download = actions.add_parser("download", help="fetch a model into the models folder (needs internet)")
    download.add_argument("names", nargs="+", help="model names (see 'dinoreg models list')")
    download.add_argument("--progress-json", action="store_true",
                          help="progress as JSON lines on stdout (used by the Slicer panel)")
    download.set_defaults(func=download_handler)
    verify = actions.add_parser("verify", help="check hashes and cards, load and run each model once")
    verify.add_argument("models", nargs="*", help="names or model files (default: every present model)")
    verify.set_defaults(func=verify_handler)
    clear = actions.add_parser("clear", help="delete downloaded models (shipped ones stay)")
    clear.add_argument("--local", action="store_true", help="also delete local models in the models folder")
    clear.set_defaults(func=clear_handler)


def list_handler(args: argparse.Namespace) -> int:
    from dinoreg.store import card_summary, list_models, models_dir, read_card  # lazy: not needed to start dinoreg


    rows = []
    for info in list_models():
        row = info.as_json()
        try:
            row["card"] = card_summary(read_card(info.card_path)) if info.card_path.is_file() else None
        except InputError as error:
            row["card"] = f"unreadable card: {error}"
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no trained models known (local models go in {models_dir()})")
    for row in rows:
        state = "present" if row["present"] else "not installed"
        print(f"{row['name']:<28} {row['source']:<9} {state}\n{'':<28} {row['card'] or row['architecture']}")
    return 0


def download_handler(args: argparse.Namespace) -> int:
    from dinoreg.store import download_model, find_model  # lazy: not needed to start dinoreg

    for name in args.names:
        info = find_model(name)
        progress = None
        if info is not None and info.source == "published":
            progress = _announce_published(name)
        if getattr(args, "progress_json", False):
            progress = _json_progress(name)
        path = download_model(name, progress)
        if getattr(args, "progress_json", False):
            print_event(done_event(name=name, path=str(path)))
        else:
            print(f"{name}: {path}")
    return 0


def _json_progress(name: str) -> Any:
    """A download progress callback ``(bytes done, total or None)`` printing the panel's JSON events."""
    shown = [-1.0]

    def progress(done: int, total: int | None) -> None:
        fraction = done / total if total else None
        if fraction is None or fraction - shown[0] >= 0.01 or fraction >= 1.0:
            shown[0] = fraction if fraction is not None else shown[0]
            print_event(progress_event(f"downloading {name}", fraction, None))

    return progress


def _announce_published(name: str) -> Any:
    """Print a published model's provenance and weights licence before its download; a progress printer."""
    from dinoreg.store.published import published_card  # lazy: not needed to start dinoreg

    card = published_card(name)
    weights = card["weights"]
    print(f"{name}: {card['paper']}\n  from {weights['url']} (about {weights['approximate_bytes'] / 1e6:.0f} MB)\n"
          f"  code licence: {card['code']['licence']}\n  weights licence: {weights['licence']}", file=sys.stderr)
    shown = [-1]

    def progress(done: int, total: int | None) -> None:
        percent = int(100 * done / total) if total else -1
        if percent != shown[0] and (percent % 5 == 0 or percent < 0):
            shown[0] = percent
            print(f"  {done / 1e6:.0f} MB" + (f" ({percent} %)" if total else ""), file=sys.stderr, flush=True)

    return progress


def verify_handler(args: argparse.Namespace) -> int:
    from dinoreg.store import list_models  # lazy: not needed to start dinoreg

    from dinoreg.networks.loading import verify_model  # lazy: imports torch

    targets = args.models or [info.name for info in list_models() if info.present]
    if not targets:
        print("no models to verify")
        return 0
    failed = 0
    for target in targets:
        try:
            print(verify_model(target))
        except InputError as error:
            failed += 1
            print(f"{target}: FAILED: {error}", file=sys.stderr)
    return 1 if failed else 0


def clear_handler(args: argparse.Namespace) -> int:
    from dinoreg.store import clear_models  # lazy: not needed to start dinoreg

    removed = clear_models(include_local=args.local)
    print(f"deleted {len(removed)} file(s)" + "".join(f"\n  {path}" for path in removed))
    return 0
