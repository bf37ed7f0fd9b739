"""Protectors as the evaluation builds them, and whole datasets protected the way a server would.

Three things differ from the registry the service uses: AdvFace may run with a shadow model other
than the bundle's (the transferability matrix, the adaptive attacker's own copy of the defence),
an eps of 0 skips the PGD loop, which is exactly equivalent (every step is projected back
to delta = 0) and saves 40 shadow passes per batch in the trade-off sweep, and ``channels_last``
runs the engine's channels-last PGD (the serving engine's ``--channels-last``: the same function up
to floating-point reordering, about 1.5x faster on CPU), which makes LFW-scale runs affordable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from plugin_service.bundle import Bundle
from plugin_service.protect.base import Protector
from plugin_service.protect.pgd import AdvFace
from plugin_service.protect.pgd_fast import FastAdvFace
from plugin_service.protect.shadow_step import ShadowStep
from plugin_service.protect.registry import ProtectorParams, build_protector
from plugin_service.runtime import progress


def make_protector(name: str, bundle: Bundle, params: ProtectorParams, shadow: nn.Module | None = None,
                   generator: torch.Generator | None = None, channels_last: bool = False) -> Protector:
    """``name`` with ``params`` (None fields: the bundle's PGD defaults); ``shadow`` replaces the bundle's S."""
    if name == "resynth":  # its step limit is its own default, not PGD's
        return build_protector(name, bundle, params)
    p = params.resolved(bundle)
    if name == "advface":
        assert p.steps is not None and p.alpha is not None and p.eps is not None and p.norm is not None
        steps = 0 if p.eps == 0 else p.steps
        model = shadow if shadow is not None else bundle.shadow
        if channels_last:
            model.to(memory_format=torch.channels_last)
            return FastAdvFace(bundle.extractor, model, ShadowStep(model, compile=False), eps=p.eps, alpha=p.alpha,
                               steps=steps, norm=p.norm, channels_last=True)
        return AdvFace(bundle.extractor, model, eps=p.eps, alpha=p.alpha, steps=steps, norm=p.norm)
    if shadow is not None:
        raise ValueError(f"protector {name!r} uses no shadow model")
    return build_protector(name, bundle, p, generator=generator)


def with_eps(params: ProtectorParams, name: str, value: float) -> ProtectorParams:
    """The sweep's knob: PGD radius for advface and random, the DP budget for dp."""
    return replace(params, dp_epsilon=value) if name == "dp" else replace(params, eps=value)


def protect_dataset(images: torch.Tensor, extractor: nn.Module, protector: Protector, order: torch.Tensor,
                    batch_size: int, device: torch.device, desc: str = "protecting") -> torch.Tensor:
    """protector(E(x)) for every uint8 face, in batches taken in ``order``; float16 on the CPU."""
    return store_dataset(lambda x: protector(extractor(x)).features, images, order, batch_size, device, desc)


@torch.no_grad()
def store_dataset(store: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, order: torch.Tensor,
                  batch_size: int, device: torch.device, desc: str = "storing") -> torch.Tensor:
    """``store(x)`` for every uint8 face x (as [0, 1] floats), in batches taken in ``order``; float16 on the CPU.

    Batches follow ``order`` because AdvFace normalises with batch statistics. float16 halves the
    memory of a few thousand 64x77x77 features (0.76 MB each), and its relative precision (1e-3)
    is far below any perturbation being studied.
    """
    out: torch.Tensor | None = None
    batches = order.split(batch_size)
    for idx in progress(batches, total=len(batches), desc=desc):
        features = store(images[idx].float().div(255.0).to(device)).to(torch.float16).cpu()
        if out is None:
            out = torch.empty((len(images), *features.shape[1:]), dtype=torch.float16)
        out[idx] = features
    assert out is not None, "no faces to protect"
    return out
