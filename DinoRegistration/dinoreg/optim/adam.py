"""Adam for one tensor, without ``torch.optim``.

Written by hand because constructing any ``torch.optim`` optimiser imports ``torch._dynamo``
(about 1.4 s of CPU on every process start with torch 2.13), a tenth of a whole zero-shot
registration on a 2-core machine. The update is torch's single-tensor Adam (``foreach=False``,
no AMSGrad, no weight decay), operation for operation, so results are bit-identical
(``Testing/test_adam.py`` compares them).
"""

from __future__ import annotations

import math

import torch


class Adam:
    """Adam (Kingma & Ba) on one tensor that requires grad.

    Args:
        parameter: the optimised tensor (updated in place by :meth:`step`).
        learning_rate: step size, in the units of ``parameter``; may be changed between steps.
        betas: decay rates of the first and second moment estimates.
        eps: added to the root of the second moment, in the units of the gradient.
    """

    def __init__(self, parameter: torch.Tensor, learning_rate: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.parameter = parameter
        self.learning_rate = float(learning_rate)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.steps = 0
        self.first_moment = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        self.second_moment = torch.zeros_like(parameter, memory_format=torch.preserve_format)

    def zero_grad(self) -> None:
        """Forget the accumulated gradient (``parameter.grad = None``)."""
        self.parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update from ``parameter.grad`` (no-op when there is no gradient)."""
        gradient = self.parameter.grad
        if gradient is None:
            return
        self.steps += 1
        self.first_moment.lerp_(gradient, 1 - self.beta1)
        self.second_moment.mul_(self.beta2).addcmul_(gradient, gradient, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1 ** self.steps
        bias_correction2_root = math.sqrt(1 - self.beta2 ** self.steps)
        denominator = (self.second_moment.sqrt() / bias_correction2_root).add_(self.eps)
        self.parameter.addcdiv_(self.first_moment, denominator, value=-self.learning_rate / bias_correction1)
