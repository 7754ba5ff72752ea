"""Training configuration: one TOML file, read into dataclasses, unknown keys refused in one line.

Example (every key optional; see ``configs/*.toml`` in the repository for one per network)::

    seed = 0
    [network]
    name = "unet"
    config = { encoder = [16, 32, 32, 32], decoder = [32, 32, 16], output_level = 1, integrate_steps = 7 }
    [data]
    source = "synthseg"          # "random-shapes", "synthseg", "folder" or "csv"
    spacing_mm = 2
    subjects = [1, 2, 3]         # SynthSeg label maps used for synthesis (1..20)
    [loss]
    dice = 1.0
    lncc = 0.5
    diffusion = 0.5
    [optimiser]
    name = "adam"
    learning_rate = 1e-4
    [run]
    steps = 2000
    checkpoint_minutes = 3
    validate_every = 250
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinoreg.errors import InputError


@dataclass
class NetworkConfig:
    """Which network (a name of the network registry) and its constructor arguments."""

    name: str = "unet"
    config: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where training pairs come from (all resampled to ``spacing_mm`` isotropic voxels).

    - ``random-shapes``: random-shape pairs of ``shape`` voxels generated on the fly;
    - ``synthseg``: T1-like brains synthesised on the fly from the SynthSeg label maps ``subjects``;
    - ``folder``: every NIfTI/NRRD/MHA image in ``path`` (label maps: files in ``labels_path`` with the same name);
    - ``csv``: a CSV file ``path`` with columns ``image`` and optionally ``labels`` (paths relative to the CSV).
    """

    source: str = "synthseg"
    spacing_mm: float = 2.0
    shape: list = field(default_factory=lambda: [80, 96, 112])
    subjects: list = field(default_factory=lambda: list(range(1, 21)))
    path: str = ""
    labels_path: str = ""
    label_ids: list = field(default_factory=list)
    cache: str = ""
    random_contrast: float = 0.3
    #: synthseg: share of pairs made from one label map deformed twice (true displacement known)
    same_subject: float = 0.0
    #: largest random velocity (mm) of the on-the-fly deformations (random shapes, synthseg, folder augmentation)
    max_velocity_mm: float = 8.0
    #: synthseg: synthesise at spacing_mm / synthesis_factor, then average-pool the images (partial-volume
    #: edges like real images brought to the training grid, instead of blocky nearest-neighbour anatomy)
    synthesis_factor: int = 1


@dataclass
class LossConfig:
    """Weights of the loss terms (``losses.RegistrationLoss``); 0 turns a term off."""

    lncc: float = 0.0
    mse: float = 0.0
    mind: float = 0.0
    dice: float = 1.0
    diffusion: float = 0.5
    bending: float = 0.0
    inverse_consistency: float = 0.0
    lncc_window: int = 5
    #: Dice is computed on label maps and field subsampled by this factor (as SynthMorph: 8x cheaper at 2)
    dice_downsample: int = 2
    #: mean squared error (voxels^2) to the true displacement, on pairs that have one (data.same_subject)
    supervised: float = 0.0


@dataclass
class OptimiserConfig:
    """Adam or AdamW with polynomial learning-rate decay to 0 over the run's steps."""

    name: str = "adam"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    poly_power: float = 0.9
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    """Length, device and bookkeeping of a run."""

    steps: int = 2000
    batch_size: int = 1
    device: str = "auto"
    threads: int = 0
    amp: bool = True
    gradient_checkpointing: bool = False
    checkpoint_minutes: float = 3.0
    validate_every: int = 250
    log_every: int = 10
    #: "real-brains" (OASIS + MNE pair, both directions), "data" (labelled pairs of validation_path), "none"
    validation: str = "none"
    validation_path: str = ""
    #: start from these weights (a model name or a .safetensors path): fine-tuning
    init_model: str = ""


@dataclass
class TrainingConfig:
    """The whole configuration of ``dinoreg train``."""

    seed: int = 0
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimiser: OptimiserConfig = field(default_factory=OptimiserConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"network": NetworkConfig, "data": DataConfig, "loss": LossConfig, "optimiser": OptimiserConfig, "run": RunConfig}
DATA_SOURCES = ("random-shapes", "synthseg", "folder", "csv")
OPTIMISERS = ("adam", "adamw")
VALIDATIONS = ("real-brains", "data", "none")


def read_toml(path: Path) -> dict:
    """Parse a TOML file (tomllib on Python >= 3.11, the ``tomli`` package before)."""
    if sys.version_info >= (3, 11):
        tomllib = importlib.import_module("tomllib")  # by name: the Python 3.9 check (vermin) reads imports
    else:  # pragma: no cover - Python 3.9/3.10
        try:
            import tomli as tomllib  # Python < 3.11 only
        except ImportError:
            raise InputError("reading TOML configs on Python < 3.11 needs the 'tomli' package: pip install tomli") from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"config file {path} not found: give an existing .toml file (examples in configs/)") from None
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"config file {path} is not valid TOML ({error}): fix the syntax") from None


def build_section(cls: type, values: Any, where: str, source: str) -> Any:
    """A dataclass from a dict, refusing unknown keys and values of the wrong type (one-line errors)."""
    if not isinstance(values, dict):
        raise InputError(f"{source}: [{where}] must be a table of keys, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{source}: unknown key '{where}.{unknown[0]}': known keys of [{where}] are {', '.join(sorted(known))}")
    defaults = cls()
    for key, value in values.items():
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise InputError(f"{source}: '{where}.{key}' must be of type {expected.__name__}, got {value!r}")
    return cls(**values)


def parse_config(raw: dict, source: str = "config") -> TrainingConfig:
    """A validated :class:`TrainingConfig` from a parsed TOML document."""
    raw = dict(raw)
    seed = raw.pop("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"{source}: 'seed' must be an integer, got {seed!r}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise InputError(f"{source}: unknown section or key '{unknown[0]}': use seed and the sections {', '.join(SECTIONS)}")
    parts = {name: build_section(cls, dict(raw.get(name, {})), name, source) for name, cls in SECTIONS.items()}
    config = TrainingConfig(seed=seed, **parts)
    checks = [
        (config.data.source in DATA_SOURCES, f"'data.source' must be one of {', '.join(DATA_SOURCES)}, got {config.data.source!r}"),
        (config.optimiser.name in OPTIMISERS, f"'optimiser.name' must be one of {', '.join(OPTIMISERS)}, got {config.optimiser.name!r}"),
        (config.run.validation in VALIDATIONS, f"'run.validation' must be one of {', '.join(VALIDATIONS)}, got {config.run.validation!r}"),
        (config.run.steps > 0 and config.run.batch_size > 0, "'run.steps' and 'run.batch_size' must be positive"),
        (config.data.source not in ("folder", "csv") or bool(config.data.path), f"data.source = {config.data.source!r} needs 'data.path'"),
        (config.data.spacing_mm > 0, "'data.spacing_mm' must be positive"),
        (config.data.synthesis_factor >= 1 and float(config.data.spacing_mm) % config.data.synthesis_factor == 0,
         f"'data.synthesis_factor' = {config.data.synthesis_factor} must divide 'data.spacing_mm' = {config.data.spacing_mm} "
         "(e.g. 2 at 4 mm: synthesise at 2 mm, pool to 4 mm)"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(f"{source}: {message}")
    return config


def load_config(path: str | Path) -> TrainingConfig:
    """Read and validate a TOML training config."""
    return parse_config(read_toml(Path(path)), str(path))
