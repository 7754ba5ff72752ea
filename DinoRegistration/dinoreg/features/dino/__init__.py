"""Frozen DINOv2 / DINOv3 backbones as a feature backend (slice-wise, PCA-reduced).

Public API:
- :func:`dino_availability` (cheap) and :func:`dino_feature_pair` (the features of a pair),
  :data:`DEFAULT_PARAMS` and :func:`effective_settings` (what 'auto' resolves to on a device);
- :func:`load_backbone`, :func:`resolve_model`, :func:`download_model`, :func:`clear_cache`;
- ``weights_cli.add_weights_subcommand`` for ``dinoreg weights list|download|verify|clear``.

transformers is imported only when a model is loaded, so importing this package stays cheap.
"""

from __future__ import annotations

from dinoreg.features.dino.backbones import (Backbone, clear_cache, download_backbone, forget_loaded_backbones,
                                             load_backbone)
from dinoreg.features.dino.slicewise import DEFAULT_PARAMS, DinoSettings, dino_feature_pair, effective_settings
from dinoreg.store.backbones import DEFAULT_MODEL, dino_availability, download_model, resolve_model

__all__ = [
    "Backbone", "DEFAULT_MODEL", "DEFAULT_PARAMS", "DinoSettings", "clear_cache", "dino_availability",
    "dino_feature_pair", "download_backbone", "download_model", "effective_settings", "forget_loaded_backbones", "load_backbone",
    "resolve_model",
]
