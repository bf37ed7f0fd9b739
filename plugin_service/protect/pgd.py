"""The AdvFace engine: PGD on the shadow model's reconstruction loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.models.shadow import batch_statistics
from plugin_service.protect.base import (
    Protection,
    Protector,
    lp_norm,
    project,
    steepest_step,
)


class AdvFace(Protector):
    r"""Adversarial facial features against reconstruction, from
    'Privacy-preserving Adversarial Facial Features' (Wang et al., CVPR 2023),
    [https://arxiv.org/abs/2305.05391].

    Given features z, the shadow model S and the extractor E:
    x~ = S(z), z~ = E(x~), then ``steps`` ascent steps on ``|S(z~ + delta) - x~|_1``
    with delta kept in the ``norm`` ball of radius ``eps`` around 0. The result z~ + delta is
    what the backend stores; z itself never leaves this call. S normalises with the statistics
    of the incoming batch (paper Sec. 3.3) and its stored running statistics stay untouched.

    Arguments:
        extractor (nn.Module): E, frozen, images in [0, 1] -> features.
        shadow (nn.Module): S, frozen, features -> images in [0, 1].
        eps (float): radius of the perturbation ball. (Default: 0.2)
        alpha (float): step size. (Default: 0.2)
        steps (int): number of steps. (Default: 40)
        norm (str): ``linf`` (sign steps, the paper) or ``l2``. (Default: 'linf')
        random_start (bool): start from a uniform point in the ball instead of z~. (Default: False)

    Shape:
        - z: (N, C, H, W), (N, 64, 77, 77) for the paper's split; any float dtype.
        - output: :class:`Protection` whose ``features`` has z's shape, dtype and device.

    Examples::
        >>> engine = AdvFace(bundle.extractor, bundle.shadow, eps=0.2, alpha=0.2, steps=40)
        >>> stored = engine(z).features
    """

    name = "advface"

    def __init__(self, extractor: nn.Module, shadow: nn.Module, eps: float = 0.2, alpha: float = 0.2,
                 steps: int = 40, norm: str = "linf", random_start: bool = False) -> None:
        if steps < 0 or eps < 0 or alpha < 0:
            raise ValueError(f"steps, eps and alpha must be >= 0 (got {steps}, {eps}, {alpha})")
        lp_norm(torch.zeros(1, 1), norm)  # rejects unknown norms at construction
        self.extractor, self.shadow = extractor, shadow
        self.eps, self.alpha, self.steps, self.norm, self.random_start = eps, alpha, steps, norm, random_start

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "alpha": self.alpha, "eps": self.eps, "norm": self.norm,
                "random_start": self.random_start}

    def _loss(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-face mean L1 between S(z) and the shadow image."""
        return F.l1_loss(self.shadow(z), target, reduction="none").flatten(1).mean(dim=1)

    def __call__(self, z: torch.Tensor) -> Protection:
        dtype = z.dtype
        z = z.float()
        with batch_statistics(), torch.enable_grad():
            with torch.no_grad():
                shadow_image = self.shadow(z)
                shadow_feature = self.extractor(shadow_image)
                before = self._loss(shadow_feature, shadow_image)
            delta = torch.zeros_like(shadow_feature)
            if self.random_start:
                delta = project(torch.empty_like(delta).uniform_(-self.eps, self.eps), self.eps, self.norm)
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = self._loss(shadow_feature + delta, shadow_image).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                delta = project(delta.detach() + self.alpha * steepest_step(grad, self.norm), self.eps, self.norm)
            with torch.no_grad():
                protected = shadow_feature + delta
                after = self._loss(protected, shadow_image)
        return Protection(protected.to(dtype), lp_norm(delta, self.norm), before, after)
