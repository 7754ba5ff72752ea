"""Joint PCA of DINO tokens: one basis for fixed and moving, fitted at token resolution.

Tokens are streamed into running sums (count, sum, sum of outer products, after subtracting a
reference vector for numerical stability); the basis is the top eigenvectors of the covariance.
Exact, deterministic, and the memory is ``C x C`` whatever the number of tokens.
"""

from __future__ import annotations

import torch


class JointPCA:
    """Accumulate ``(N, C)`` token batches with :meth:`add`, then :meth:`fit` and :meth:`project`.

    Projections are centred and divided by ``sqrt(sum of the kept eigenvalues)``, so a foreground
    token has unit expected squared norm whatever the backbone (SSD costs stay comparable).
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.channels = channels
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64, device=device)
        self.mean: torch.Tensor | None = None
        self.basis: torch.Tensor | None = None  # (C, P) float32, columns = principal axes
        self.eigenvalues: torch.Tensor | None = None

    def add(self, tokens: torch.Tensor) -> None:
        """Add foreground tokens ``(N, C)`` of either image."""
        if tokens.numel() == 0:
            return
        tokens = tokens.float()
        if self.shift is None:
            self.shift = tokens.mean(0)
        centred = tokens - self.shift
        self.count += tokens.shape[0]
        self.sum += centred.sum(0).double()
        self.outer += (centred.T @ centred).double()

    def fit(self, components: int) -> None:
        """Keep the ``components`` leading principal axes (components <= C)."""
        if self.count < 2 or self.shift is None:
            raise ValueError("JointPCA.fit needs at least two tokens")
        components = min(components, self.channels)
        mean_shifted = self.sum / self.count
        covariance = self.outer / self.count - torch.outer(mean_shifted, mean_shifted)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.cpu())
        order = torch.argsort(eigenvalues, descending=True)[:components]
        self.eigenvalues = eigenvalues[order].clamp_min(0.0)
        vectors = eigenvectors[:, order]
        # deterministic signs: largest-magnitude entry of each axis positive
        signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
        vectors = vectors * torch.where(signs == 0, torch.ones_like(signs), signs)
        scale = float(self.eigenvalues.sum().sqrt()) or 1.0
        device = self.sum.device
        self.mean = (self.shift.double() + mean_shifted).float().to(device)
        self.basis = (vectors / scale).float().to(device)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(..., C)`` tokens -> ``(..., P)`` float32 projections."""
        if self.basis is None or self.mean is None:
            raise ValueError("JointPCA.project before fit")
        return (tokens.float() - self.mean) @ self.basis
