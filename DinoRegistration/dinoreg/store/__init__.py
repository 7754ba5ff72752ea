"""The one model store: every file the engine downloads or keeps for models, in one place.

Two kinds of model live here, with one set of primitives (``downloads.py``: verified, atomic
downloads and SHA-256; one cache root ``$DINOREG_CACHE``, else ``~/.cache/dinoreg``):

- trained registration networks (``networks.py``: the registry ``networks.json``, shipped files in
  ``shipped/``, downloads and local models in :func:`models_dir`; ``checkpoints.py``: weights +
  card files; ``cards.py``: the card format);
- frozen DINO backbones (``backbones.py``: find, download, clear; ``backbone_catalog.py``: the known
  backbones in ``backbones.json``).

A network's files are two with one stem: ``<name>.safetensors`` (the state dict, including
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

API for networks: :func:`list_models`, :func:`find_model`, :func:`locate_model` (the one place a name or
path becomes files), :func:`read_model_files` (state dict + card, SHA-256 checked), :func:`download_model`,
:func:`clear_models`, :func:`models_dir`, :func:`save_model`, :func:`read_card`, :func:`registry_entry`.
Building a network from them is ``dinoreg.networks.loading`` (a layer above). No torch at import.
"""

from __future__ import annotations

from dinoreg.store.cards import card_summary, default_preprocessing
from dinoreg.store.checkpoints import read_card, save_model
from dinoreg.store.downloads import sha256_of
from dinoreg.store.networks import (ModelInfo, clear_models, download_model, find_model, list_models, locate_model,
                                    models_dir, read_model_files, registry_entry)

__all__ = ["save_model", "read_card", "locate_model", "read_model_files", "sha256_of", "card_summary",
           "default_preprocessing", "ModelInfo", "list_models", "find_model", "download_model", "clear_models",
           "models_dir", "registry_entry"]
