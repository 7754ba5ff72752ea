"""One factory from a ``[data]`` config section to a pair sampler (``sample(generator) -> TrainingPair``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dinoreg.errors import InputError


def default_cache() -> Path:
    """``$DINOREG_CACHE/training`` or ``~/.cache/dinoreg/training``: prepared label maps and pairs."""
    root = os.environ.get("DINOREG_CACHE") or Path.home() / ".cache" / "dinoreg"
    return Path(root) / "training"


class RandomShapeSource:
    """Random-shape pairs of a fixed shape (label ids 0..n_shapes-1 for Dice)."""

    def __init__(self, shape, max_velocity_voxels: float, device: torch.device | str) -> None:
        from dinoreg.data.random_shapes import RandomShapeSettings  # lazy: imports numpy

        self.shape = tuple(int(s) for s in shape)
        self.settings = RandomShapeSettings(max_velocity_voxels=max_velocity_voxels)
        self.label_ids = list(range(self.settings.n_shapes))
        self.device = device

    def sample(self, generator: torch.Generator):
        from dinoreg.data.random_shapes import random_shape_pair  # lazy: imports numpy

        return random_shape_pair(self.shape, generator, self.settings, self.device)


def make_source(data, device: torch.device | str = "cpu", multiple: int = 16):
    """The pair sampler of a :class:`~dinoreg.training.config.DataConfig`."""
    cache = Path(data.cache).expanduser() if data.cache else default_cache()
    if data.source == "random-shapes":
        if any(int(s) % multiple for s in data.shape):
            raise InputError(f"data.shape {list(data.shape)} must be multiples of {multiple} for this network")
        return RandomShapeSource(data.shape, data.max_velocity_mm / data.spacing_mm, device)
    if data.source == "synthseg":
        from dinoreg.data import synthesis  # lazy: imports SimpleITK, numpy, scipy
        from dinoreg.data.brain_pairs import (DICE_LABELS, BrainPairSampler,  # lazy: imports SimpleITK, numpy, scipy
                                              BrainSynthSettings)  # lazy: imports SimpleITK, numpy, scipy

        if float(data.spacing_mm) != int(data.spacing_mm) or not 1 <= int(data.spacing_mm) <= 4:
            raise InputError(f"data.spacing_mm = {data.spacing_mm}: synthseg training works at 1, 2, 3 or 4 mm")
        bad = [n for n in data.subjects if not (isinstance(n, int) and 1 <= n <= 20)]
        if bad or not data.subjects:
            raise InputError(f"data.subjects must list SynthSeg label maps 1..20, got {list(data.subjects)}")
        if not synthesis.SYNTHSEG_DIR.is_dir():
            raise InputError(f"SynthSeg label maps not found in {synthesis.SYNTHSEG_DIR}: set DINOREG_SHARED_DATA to the folder holding synthseg/")
        settings = BrainSynthSettings(random_contrast=data.random_contrast, max_velocity_mm=data.max_velocity_mm,
                                      same_subject=data.same_subject)
        source = BrainPairSampler(data.subjects, int(data.spacing_mm), cache, settings, device, data.synthesis_factor)
        if any(s % multiple for s in source.shape):
            raise InputError(f"synthseg volumes at {data.spacing_mm} mm are {source.shape}: not multiples of {multiple}")
        source.label_ids = list(DICE_LABELS)
        return source
    from dinoreg.data.volumes import (VolumePairSampler, csv_entries,  # lazy: imports SimpleITK, numpy, scipy
                                      folder_entries)  # lazy: imports SimpleITK, numpy, scipy

    entries = folder_entries(data.path, data.labels_path) if data.source == "folder" else csv_entries(data.path)
    source = VolumePairSampler(entries, data.spacing_mm, multiple, data.max_velocity_mm / data.spacing_mm, device)
    if data.label_ids:
        source.label_ids = list(data.label_ids)
    return source
