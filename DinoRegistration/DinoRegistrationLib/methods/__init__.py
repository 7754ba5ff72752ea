"""Registration methods, one module per family, all reachable through the registry in ``base``."""

from __future__ import annotations

import importlib

# Modules whose import registers methods (``@register_method``). A new family adds its module here.
BUILTIN_METHOD_MODULES = ["identity", "affine", "zeroshot"]


def load_builtin_methods() -> None:
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(f"{__name__}.{module}")
