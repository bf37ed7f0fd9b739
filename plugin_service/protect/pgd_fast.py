"""AdvFace's PGD with the engine's speed-ups: a reusable (compiled) step, channels-last, early stop."""

from __future__ import annotations

import torch
from torch import nn

from plugin_service.models.shadow import batch_statistics
from plugin_service.protect.base import Protection, lp_norm, project, steepest_step
from plugin_service.protect.early_stop import BestState, EarlyStop, StopTracker
from plugin_service.protect.pgd import AdvFace
from plugin_service.protect.shadow_step import ShadowStep


class FastAdvFace(AdvFace):
    r"""AdvFace ('Privacy-preserving Adversarial Facial Features', Wang et al., CVPR 2023,
    [https://arxiv.org/abs/2305.05391]) computed faster, with :class:`AdvFace` as its reference.

    The same ascent on ``|S(E(S(z)) + delta) - S(z)|_1`` with the batch's BatchNorm statistics,
    with the loss and gradient from a :class:`ShadowStep` the engine keeps across calls (so its
    compilation is paid once per batch size), optionally on channels-last tensors, and without a
    host synchronisation inside the loop. Without early stop it computes the reference's function;
    floating-point reordering (compiled kernels, channels-last convolutions) can flip the sign of
    gradient elements that are zero up to rounding, so a few elements may differ by a step.

    Arguments:
        extractor (nn.Module): E, frozen, images in [0, 1] -> features.
        shadow (nn.Module): S, frozen, features -> images in [0, 1]; the one ``step`` wraps.
        step (ShadowStep): the loss-and-gradient function of ``shadow``.
        eps (float): radius of the perturbation ball. (Default: 0.2)
        alpha (float): step size. (Default: 0.2)
        steps (int): number of steps, at most. (Default: 40)
        norm (str): ``linf`` (sign steps, the paper) or ``l2``. (Default: 'linf')
        random_start (bool): start from a uniform point in the ball. (Default: False)
        channels_last (bool): feed S channels-last tensors. (Default: False)
        early_stop (EarlyStop | None): per-face stopping rule (see ``early_stop.py``); None runs
            every step. (Default: None)
        check_every (int): steps between the host's checks that every face stopped. (Default: 4)
        keep_best (bool): each face ends with the state, among those its steps scored, with the
            highest shadow loss, instead of its last one; with early stop this applies to the
            faces that ran every step (a stopped face keeps its best state anyway). (Default: False)

    Shape:
        - z: (N, C, H, W), (N, 64, 77, 77) for the paper's split; any float dtype.
        - output: :class:`Protection` whose ``features`` has z's shape, dtype and device and whose
          ``steps`` holds the steps each face took.

    Examples::
        >>> step = ShadowStep(bundle.shadow, compile=True)
        >>> engine = FastAdvFace(bundle.extractor, bundle.shadow, step, early_stop=EarlyStop())
        >>> stored = engine(z).features
    """

    def __init__(self, extractor: nn.Module, shadow: nn.Module, step: ShadowStep, eps: float = 0.2,
                 alpha: float = 0.2, steps: int = 40, norm: str = "linf", random_start: bool = False,
                 channels_last: bool = False, early_stop: EarlyStop | None = None, check_every: int = 4,
                 keep_best: bool = False) -> None:
        super().__init__(extractor, shadow, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=random_start)
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.step, self.channels_last, self.early_stop, self.check_every = step, channels_last, early_stop, check_every
        self.keep_best = keep_best

    def __call__(self, z: torch.Tensor) -> Protection:
        dtype = z.dtype
        z = z.float()
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        with batch_statistics(), torch.no_grad():
            shadow_image = self.shadow(z)
            shadow_feature = self.extractor(shadow_image)
            if self.channels_last:
                shadow_feature = shadow_feature.contiguous(memory_format=torch.channels_last)
            before = self._loss(shadow_feature, shadow_image)
            delta = torch.zeros_like(shadow_feature)
            if self.random_start:
                delta = project(torch.empty_like(delta).uniform_(-self.eps, self.eps), self.eps, self.norm)
            tracker = StopTracker(self.early_stop, delta) if self.early_stop is not None else None
            best = tracker.best if tracker is not None else BestState(delta) if self.keep_best else None
            for i in range(self.steps):
                with torch.enable_grad():
                    loss, grad = self.step(shadow_feature, delta, shadow_image)
                proposed = project(delta + self.alpha * steepest_step(grad, self.norm), self.eps, self.norm)
                if tracker is None:
                    if best is not None:
                        best.update(loss, delta)
                    delta = proposed
                    continue
                delta = tracker.update(i, loss, delta, proposed)
                if (i + 1) % self.check_every == 0 and tracker.all_stopped():
                    break
            if best is not None and self.keep_best:
                delta = best.delta
            protected = shadow_feature + delta
            after = self._loss(protected, shadow_image)
        steps = tracker.steps.float() if tracker is not None else torch.full_like(before, float(self.steps))
        return Protection(protected.contiguous().to(dtype), lp_norm(delta, self.norm), before, after, steps=steps)

    def params(self) -> dict[str, object]:
        params = super().params()
        if self.keep_best:
            params |= {"keep_best": True}
        if self.early_stop is not None:
            params |= {"early_stop_patience": self.early_stop.patience, "early_stop_min_gain": self.early_stop.min_gain}
        return params
