"""DinoRegistration engine: deformable registration of 3D volumes with foundation-model features.

Pure Python (torch, SimpleITK, numpy); imports no Slicer, Qt or VTK. The public API is here, one
name each, loaded on first use so ``import dinoreg`` stays cheap (no torch)::

    import dinoreg
    fixed, moving = dinoreg.read_volume("fixed.nii.gz"), dinoreg.read_volume("moving.nii.gz")
    result = dinoreg.register(fixed, moving, dinoreg.RegistrationOptions(method="mind-zeroshot"))
    dinoreg.write_outputs(result, "out")

Layers, top to bottom (arrows point down only; ``Testing/test_architecture.py`` checks it):
``cli`` > ``app`` > ``training`` > ``data``, ``report`` > ``methods`` > ``networks``, ``losses`` >
``features``, ``optim`` > ``store``, ``io`` > ``core`` > ``errors``, ``progress``, ``peak_memory``,
``requirements``. Inside the engine nothing imports this facade except for ``__version__``.
"""

import os
from importlib import import_module
from typing import Any

# Passive OpenMP waiting, set before torch is imported: with the default spin-waiting, every small
# torch operation crawls (3-30x measured) when the CPU is shared with other work, e.g. inside Slicer.
# One registration started from a terminal has the CPU to itself and spins briefly instead
# (``cli/main.py``, ``spin_briefly_while_waiting``); a policy the user (or Slicer's module) set is kept.
OPENMP_WAITING_SET_BY_USER = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

#: public name -> module that defines it (loaded on first attribute access, PEP 562)
_PUBLIC = {
    "register": "dinoreg.app.pipeline",
    "RegistrationOptions": "dinoreg.app.pipeline",
    "RegistrationResult": "dinoreg.app.pipeline",
    "write_outputs": "dinoreg.app.outputs",
    "read_volume": "dinoreg.io.volumes",
    "write_volume": "dinoreg.io.volumes",
    "read_mask": "dinoreg.io.volumes",
    "read_label_volume": "dinoreg.io.volumes",
    "Volume": "dinoreg.core.volume",
    "Grid": "dinoreg.core.volume",
    "Transform": "dinoreg.core.transforms",
    "read_transform": "dinoreg.io.itk_files",
    "write_transform": "dinoreg.io.itk_files",
    "InputError": "dinoreg.errors",
    "RegistrationFailed": "dinoreg.errors",
    "Cancelled": "dinoreg.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dinoreg' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_PUBLIC))
