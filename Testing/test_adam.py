"""The hand-written single-tensor Adam (optim/adam.py) against torch.optim.Adam, and why it exists."""

import torch

from dinoreg.optim.adam import Adam


def quadratic_with_noise(parameter: torch.Tensor, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    target = torch.randn(parameter.shape, generator=generator)
    return ((parameter - target) ** 2 * torch.linspace(0.1, 10.0, parameter.numel()).view_as(parameter)).sum()


def run(optimiser_kind: str, learning_rates: list, eps: float) -> torch.Tensor:
    parameter = torch.zeros(2, 3, 4, 5).requires_grad_(True)
    if optimiser_kind == "torch":
        optimiser = torch.optim.Adam([parameter], lr=learning_rates[0], eps=eps, foreach=False)
    else:
        optimiser = Adam(parameter, learning_rates[0], eps=eps)
    for step, learning_rate in enumerate(learning_rates):
        if optimiser_kind == "torch":
            optimiser.param_groups[0]["lr"] = learning_rate
        else:
            optimiser.learning_rate = learning_rate
        optimiser.zero_grad()
        quadratic_with_noise(parameter, step).backward()
        optimiser.step()
    return parameter.detach()


def test_adam_is_bit_identical_to_torch_adam_with_a_changing_learning_rate():
    schedule = [1.0 / (1 + step) for step in range(25)]
    for eps in (1e-8, 0.1):
        ours, theirs = run("ours", schedule, eps), run("torch", schedule, eps)
        assert torch.equal(ours, theirs)
        assert ours.abs().max() > 0.1  # it moved


def test_a_step_without_gradient_changes_nothing():
    parameter = torch.ones(3).requires_grad_(True)
    optimiser = Adam(parameter, 0.5)
    optimiser.step()
    assert torch.equal(parameter.detach(), torch.ones(3)) and optimiser.steps == 0

