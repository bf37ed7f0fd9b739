"""Protector names -> instances; the names and per-call parameters themselves are in ``protector_params``."""

from __future__ import annotations

import torch

from plugin_service.bundle import Bundle
from plugin_service.protect.base import Protector
from plugin_service.protect.baselines import Identity, LaplaceDP, RandomNoise
from plugin_service.protect.pgd import AdvFace
from plugin_service.protect.resynth import Resynth
from plugin_service.names import PROTECTORS
from plugin_service.protector_params import ProtectorParams


def build_protector(name: str, bundle: Bundle, params: ProtectorParams = ProtectorParams(),
                    generator: torch.Generator | None = None) -> Protector:
    """The named protector on ``bundle``'s models; ``steps`` is resynth's step limit when given."""
    if name == "resynth":
        recognizer, start = bundle.require_recognizer("the resynth protector")
        d = bundle.manifest.resynth
        return Resynth(recognizer.head, start,
                       target_cosine=d.target_cosine if params.target_cosine is None else params.target_cosine,
                       max_steps=d.max_steps if params.steps is None else params.steps, lr=d.lr)
    p = params.resolved(bundle)
    assert p.steps is not None and p.alpha is not None and p.eps is not None and p.norm is not None
    if name == "advface":
        return AdvFace(bundle.extractor, bundle.shadow, eps=p.eps, alpha=p.alpha, steps=p.steps, norm=p.norm)
    if name == "random":
        return RandomNoise(eps=p.eps, alpha=p.alpha, steps=p.steps, norm=p.norm, generator=generator)
    if name == "dp":
        return LaplaceDP(epsilon=p.dp_epsilon, bound=p.dp_bound, generator=generator)
    if name == "none":
        return Identity()
    raise ValueError(f"unknown protector {name!r}; choose one of {', '.join(PROTECTORS)}")
