"""``dinoreg weights list|download|verify|clear``: manage DINO backbone weights from the shell.

The main CLI calls :func:`add_weights_subcommand` with its argparse sub-parsers; every action
sets ``func`` to a handler ``handler(args) -> int`` (0 = success, 1 = a check failed,
2 = bad input, reported as one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from dinoreg.errors import InputError, one_line
from dinoreg.progress import DownloadWatcher, done_event, error_event, print_event


def add_weights_subcommand(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``weights`` command (with list / download / verify / clear actions)."""
    weights = subparsers.add_parser("weights", help="list, download, verify or clear DINO backbone weights",
                                    description="Manage the DINO backbones used for DINO features. Hub models go to "
                                                "the Hugging Face cache; converted Meta checkpoints to $DINOREG_CACHE/dino.")
    actions = weights.add_subparsers(dest="weights_action", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser("list", help="known models, whether installed, size and location")
    listing.set_defaults(func=_guarded(list_handler))

    download = actions.add_parser("download", help="fetch a model into the cache (needs internet)")
    download.add_argument("name", nargs="?", default=None,
                          help="registry name or Hugging Face hub id (default: the default model that "
                               "'dinoreg weights list' names)")
    download.add_argument("--source", choices=("hub", "meta"), default="hub",
                          help="hub: Hugging Face (default); meta: Meta's original .pth, converted once")
    download.add_argument("--progress-json", action="store_true",
                          help="progress as JSON lines on stdout (the Slicer panel's progress bar)")
    download.set_defaults(func=_guarded(download_handler))

    verify = actions.add_parser("verify", help="load models and run a tiny forward pass")
    verify.add_argument("models", nargs="*", help="names, hub ids, folders or .pth files (default: all installed)")
    verify.set_defaults(func=_guarded(verify_handler))

    clear = actions.add_parser("clear", help="delete the DINO weights cache")
    clear.add_argument("--hub", action="store_true", help="also delete the registry models from the Hugging Face cache")
    clear.set_defaults(func=_guarded(clear_handler))


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn an ``InputError`` into one line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except InputError as error:
            if getattr(args, "progress_json", False):
                print_event(error_event(str(error)))
            print(f"error: {error}", file=sys.stderr)
            return 2

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def list_handler(args: argparse.Namespace) -> int:
    """Print the registry with install state, size and where each model is (or would come from)."""
    from dinoreg.store.backbone_catalog import default_model_name, known_models  # lazy: not needed to start dinoreg
    from dinoreg.store.backbones import DOWNLOAD_COMMAND, dino_cache_dir, hf_cache_dir, installed_path  # lazy: not needed to start dinoreg

    rows = [("NAME", "FAMILY", "ARCH", "DIM", "REG", "SIZE", "INSTALLED", "LOCATION / HUB ID")]
    for entry in known_models():
        path = installed_path(entry)
        rows.append((entry.name, entry.family, entry.architecture, str(entry.hidden_size), str(entry.registers),
                     f"{entry.size_mb} MB", "yes" if path else "no", str(path) if path else entry.hub_id))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print(f"\ncaches: {hf_cache_dir()} (hub), {dino_cache_dir()} (converted Meta checkpoints)")
    print(f"default: {default_model_name()}; fetch one with: {DOWNLOAD_COMMAND} NAME; DINOv3 models are gated "
          "(accept the license on the hub page, then 'hf auth login')")
    return 0


def _download(name: str, source: str):
    """A backbone into the store; a Meta checkpoint is converted by the feature layer on the way."""
    from dinoreg.store.backbones import download_model  # lazy: not needed to start dinoreg

    convert = None
    if source == "meta":
        from dinoreg.features.dino.backbones import save_converted_checkpoint  # lazy: imports torch and transformers

        convert = save_converted_checkpoint
    return download_model(name, source=source, convert=convert)


def download_handler(args: argparse.Namespace) -> int:
    """Download one model (hub or Meta source) and say where it is; with ``--progress-json``, JSON progress
    events (bytes arrived in the caches against the registry's size) instead of the text lines."""
    from dinoreg.store.backbone_catalog import default_model_name, find_model  # lazy: not needed to start dinoreg
    from dinoreg.store.backbones import dino_cache_dir, hf_cache_dir  # lazy: not needed to start dinoreg

    args.name = args.name or default_model_name()
    print(f"downloading {args.name} from {'Meta' if args.source == 'meta' else 'the Hugging Face hub'} ...",
          file=sys.stderr)
    if not getattr(args, "progress_json", False):
        folder = _download(args.name, args.source)
        print(f"{args.name}: installed in {folder}")
        print(f"check it with: dinoreg weights verify {args.name}")
        return 0

    entry = find_model(args.name)
    total = entry.size_mb * 2**20 if entry is not None and entry.size_mb else None
    with DownloadWatcher([hf_cache_dir(), dino_cache_dir()], total, f"downloading {args.name}"):
        folder = _download(args.name, args.source)
    print_event(done_event(name=args.name, path=str(folder)))
    return 0


def verify_handler(args: argparse.Namespace) -> int:
    """Load each model and encode a small blank image; print OK or the problem per model."""
    from dinoreg.store.backbone_catalog import default_model_name, known_models  # lazy: not needed to start dinoreg
    from dinoreg.store.backbones import DOWNLOAD_COMMAND, installed_path  # lazy: not needed to start dinoreg

    specs = list(args.models) or [entry.name for entry in known_models() if installed_path(entry)]
    if not specs:
        print(f"no DINO model is installed; fetch one with: {DOWNLOAD_COMMAND} {default_model_name()}",
              file=sys.stderr)
        return 1
    failures = 0
    for spec in specs:
        message = verify_model(spec)
        failures += not message.startswith("OK")
        print(f"{spec}: {message}")
    return 1 if failures else 0


def verify_model(spec: str) -> str:
    """'OK: ...' when ``spec`` loads and encodes a 2x2-token image to finite tokens, else the problem.

    Never downloads: a model that is not installed is reported with the command that fetches it.
    """
    from dinoreg.store.backbones import missing_model_message, resolve_model  # lazy: not needed to start dinoreg

    import torch  # lazy: torch is not needed to start this command

    from dinoreg.features.dino.backbones import imagenet_normalise, load_backbone  # lazy: imports torch

    try:
        source = resolve_model(spec)
        if not source.installed:
            return f"FAILED: {missing_model_message(source)}"
        backbone = load_backbone(spec, "cpu")
        side = 2 * backbone.patch_size
        tokens = backbone.encode(imagenet_normalise(torch.full((1, 1, side, side), 0.5)))
    except InputError as error:
        return f"FAILED: {error}"
    except Exception as error:  # a broken model must not stop the other checks
        return f"FAILED: {one_line(error)}"
    if tuple(tokens.shape) != (1, 4, backbone.hidden_size) or not bool(torch.isfinite(tokens).all()):
        return f"FAILED: forward pass gave tokens of shape {tuple(tokens.shape)} or non-finite values"
    return (f"OK: {backbone.family} width {backbone.hidden_size}, patch {backbone.patch_size}, "
            f"{backbone.num_prefix_tokens - 1} registers, from {backbone.source}")


def clear_handler(args: argparse.Namespace) -> int:
    """Delete the DINO cache (and with --hub the registry models in the Hugging Face cache)."""
    from dinoreg.store.backbones import clear_cache  # lazy: not needed to start dinoreg

    removed = clear_cache(include_hub=args.hub)  # this process holds no loaded models: files only
    for folder in removed:
        print(f"removed {folder}")
    if not removed:
        print("nothing to remove")
    return 0
