"""The paper's baselines (Sec. 4.2), behind the same interface as AdvFace."""

from __future__ import annotations

from typing import Any

import torch

from plugin_service.protect.base import (
    Protection,
    Protector,
    lp_norm,
    project,
    steepest_step,
)


class Identity(Protector):
    """No protection: the stored feature is z. The reference row of every evaluation table."""

    name = "none"

    def __call__(self, z: torch.Tensor) -> Protection:
        return Protection(z.clone(), torch.zeros(z.shape[0], device=z.device))

    def params(self) -> dict[str, Any]:
        return {}


class RandomNoise(Protector):
    """Iterative random sign noise with AdvFace's steps, step size and bound, applied to z.

    It spends the same perturbation budget without aiming it, which isolates what the shadow
    model's gradient buys.
    """

    name = "random"

    def __init__(self, eps: float = 0.2, alpha: float = 0.2, steps: int = 40, norm: str = "linf",
                 generator: torch.Generator | None = None) -> None:
        self.eps, self.alpha, self.steps, self.norm, self.generator = eps, alpha, steps, norm, generator

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "alpha": self.alpha, "eps": self.eps, "norm": self.norm}

    def __call__(self, z: torch.Tensor) -> Protection:
        delta = torch.zeros_like(z, dtype=torch.float32)
        for _ in range(self.steps):
            noise = torch.rand(z.shape, generator=self.generator).to(z.device) - 0.5
            delta = project(delta + self.alpha * steepest_step(noise, self.norm), self.eps, self.norm)
        return Protection((z.float() + delta).to(z.dtype), lp_norm(delta, self.norm))


class LaplaceDP(Protector):
    """Laplace mechanism on features: clip each element to [0, bound], add Laplace(bound / epsilon).

    With every element clipped to a range of width ``bound`` the per-element sensitivity is
    ``bound``, so the noise scale bound/epsilon gives epsilon-DP per element (the paper's
    'DP' baseline; E ends in a ReLU, so features are non-negative).

    Arguments:
        epsilon (float): privacy budget; smaller is more private. (Default: 1.0)
        bound (float): clipping bound, the sensitivity. (Default: 3.0, about the 99th percentile
            of the shipped E's activations on faces; below it clipping alone destroys features.)
    """

    name = "dp"

    def __init__(self, epsilon: float = 1.0, bound: float = 3.0, generator: torch.Generator | None = None) -> None:
        if epsilon <= 0 or bound <= 0:
            raise ValueError(f"epsilon and bound must be > 0 (got {epsilon}, {bound})")
        self.epsilon, self.bound, self.generator = epsilon, bound, generator

    @property
    def scale(self) -> float:
        return self.bound / self.epsilon

    def params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "bound": self.bound, "scale": self.scale}

    def __call__(self, z: torch.Tensor) -> Protection:
        clipped = z.float().clamp(0.0, self.bound)
        u = torch.rand(z.shape, generator=self.generator).to(z.device).clamp(1e-7, 1 - 1e-7) - 0.5
        noise = -self.scale * u.sign() * torch.log1p(-2.0 * u.abs())
        out = clipped + noise
        return Protection(out.to(z.dtype), lp_norm(out - z.float(), "linf"))
