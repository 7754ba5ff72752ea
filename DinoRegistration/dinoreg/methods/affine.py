"""``affine``: the affine stage alone (SimpleITK, Mattes mutual information)."""

from __future__ import annotations

from dinoreg.core.transforms import Transform
from dinoreg.methods.base import Method, RegistrationProblem, register_method


@register_method
class AffineMethod(Method):
    name = "affine"
    label, rank = "Affine only", 90
    summary = "Rigid then affine alignment (moments initialisation, multi-resolution Mattes MI; any contrast)."
    stage_weights = {}

    def run(self, problem: RegistrationProblem, initial: Transform) -> Transform:
        # The pipeline's affine stage already produced ``initial``; nothing more to do.
        return initial
