"""``identity``: no registration at all (the 'before' baseline of every comparison)."""

from __future__ import annotations

from dinoreg.core.transforms import Transform
from dinoreg.methods.base import Method, RegistrationProblem, register_method


@register_method
class IdentityMethod(Method):
    name = "identity"
    label, rank = "No registration", 100
    summary = "No registration: moving resampled on the fixed grid as it is (baseline)."
    uses_affine_stage = False

    def run(self, problem: RegistrationProblem, initial: Transform) -> Transform:
        return initial
