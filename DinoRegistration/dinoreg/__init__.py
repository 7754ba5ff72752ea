"""DinoRegistration engine: deformable registration of 3D volumes with foundation-model features.

Pure Python (torch, SimpleITK, numpy); imports no Slicer, Qt or VTK. Public entry points:
``register`` (pipeline), ``read_volume`` / ``write_volume`` (io), ``Transform`` (transforms).
Heavy modules are imported lazily so ``import dinoreg`` stays cheap.
"""

import os

# Passive OpenMP waiting, set before torch is imported: with the default spin-waiting, every small
# torch operation crawls (3-30x measured) when the CPU is shared with other work, e.g. inside Slicer.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
