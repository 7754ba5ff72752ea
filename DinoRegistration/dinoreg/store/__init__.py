"""Trained registration models: checkpoints, model cards, the registry, downloads.

A model is two files with one stem: ``<name>.safetensors`` (the network's state dict, including
buffers such as the FMIR channel basis) and ``<name>.json``, its model card:

- ``name``, ``architecture`` (a ``networks`` registry name) and ``config`` (the full network config);
- ``features``: the frozen feature extractor and its identity (e.g. the DINO model and weight hash);
- ``preprocessing``: ``spacing_mm`` (isotropic working spacing), ``shape_multiple``, ``orientation``
  (axis code of the array axes i, j, k, e.g. ``"RAS"``, or ``"any"``), ``normalisation``
  (``{"kind": "percentile", "low": 0.5, "high": 99.5}``);
- ``training`` (data, steps, hardware, wall_time_s, losses ...), ``validation`` (e.g. ``dice``),
  ``engine_version``, ``weights_sha256`` and ``weights_bytes`` of the safetensors file;
- optional ``label`` (display label of its method) and ``rank`` (order of recommendation among
  methods, lower first: dino-mind 10, dino-zeroshot 20, mind-zeroshot 30, learned default 50,
  affine 90, identity 100).

API: :func:`save_model`, :func:`load_model` (``checkpoint.py``); :func:`list_models`,
:func:`find_model`, :func:`download_model`, :func:`verify_model`, :func:`clear_models`,
:func:`models_dir` (``registry.py``); :func:`card_summary` (``card.py``). Shipped models live in
``models/shipped/`` and are listed in ``models/registry.json`` with their SHA-256; downloads and
local models live in :func:`models_dir` (``$DINOREG_MODELS_DIR``, else ``<dinoreg cache>/models``).
"""

from __future__ import annotations

from dinoreg.store.cards import card_summary, default_preprocessing
from dinoreg.store.checkpoints import load_model, read_card, save_model, sha256_of
from dinoreg.store.networks import (ModelInfo, clear_models, download_model, find_model, list_models, models_dir, registry_entry, verify_model)

__all__ = ["save_model", "load_model", "read_card", "sha256_of", "card_summary", "default_preprocessing", "ModelInfo",
           "list_models", "find_model", "download_model", "verify_model", "clear_models", "models_dir",
           "registry_entry"]
