"""DinoRegistration engine: deformable registration of 3D volumes with foundation-model features.

Pure Python (torch, SimpleITK, numpy); imports no Slicer, Qt or VTK. Public entry points:
``register`` (pipeline), ``read_volume`` / ``write_volume`` (io), ``Transform`` (transforms).
Heavy modules are imported lazily so ``import DinoRegistrationLib`` stays cheap.
"""

__version__ = "0.1.0"
