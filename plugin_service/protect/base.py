"""The interface every protector implements, and the per-face numbers it reports."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Protection:
    """Result of protecting one batch; every per-face tensor has shape (N,).

    ``shadow_loss_before``/``after`` are the L1 reconstruction loss of the shadow model on the
    shadow feature and on the protected feature; their ratio is the privacy gain an operator
    watches. Protectors without a shadow model leave them as None. ``cosine`` and ``steps`` are
    resynth's: how close the stored feature's embedding came to the original's, and at what cost.
    """

    features: torch.Tensor
    perturbation_norm: torch.Tensor
    shadow_loss_before: torch.Tensor | None = None
    shadow_loss_after: torch.Tensor | None = None
    cosine: torch.Tensor | None = None  # resynth: cos(R(stored), R(z)) reached
    steps: torch.Tensor | None = None  # resynth: optimiser steps taken; AdvFace (FastAdvFace): PGD steps each face ran


class Protector(ABC):
    """Maps a batch of features (N, C, H, W) to protected features of the same shape and dtype.

    Implementations are stateless between calls and never modify their models, so one
    instance may serve concurrent batches.
    """

    name: str = ""

    @abstractmethod
    def __call__(self, z: torch.Tensor) -> Protection: ...

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The parameters in effect, as reported by the info RPC and the evaluation report."""


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-face norm of a perturbation batch: ``linf`` or ``l2``."""
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(dim=1)
    raise ValueError(f"unknown norm {norm!r}; choose linf or l2")


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Projects each face's perturbation onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    factor = (eps / lp_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def steepest_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Unit-size ascent direction: sign for L_inf, the normalised gradient for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / lp_norm(grad, "l2").clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
