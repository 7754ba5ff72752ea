"""Registration methods, one module per family, all reachable through the registry in ``base``."""

from __future__ import annotations

import importlib

# Modules whose import registers methods (``@register_method``). A new family adds its module here.
BUILTIN_METHOD_MODULES = ["identity", "affine", "zeroshot", "published", "learned"]


def load_builtin_methods() -> None:
    """Import the method modules; a module with ``refresh_methods`` (learned models) re-scans its sources."""
    for module in BUILTIN_METHOD_MODULES:
        loaded = importlib.import_module(f"{__name__}.{module}")
        refresh = getattr(loaded, "refresh_methods", None)
        if refresh is not None:
            refresh()
