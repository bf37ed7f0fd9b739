"""Training a reconstruction network x ~ R(f(x)) with L1 loss, for shadows and attackers alike.

``features_of`` decides what the network learns to invert: E(x) for the defender's shadow
model and the paper's attackers, protector(E(x)) for the adaptive attacker that knows the
defence. Validation (L1, PSNR, SSIM) runs on held-out faces after each epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.faces import FaceSet
from plugin_service.image_metrics import psnr, ssim
from plugin_service.models.shadow import ShadowSpec, build_shadow
from plugin_service.runtime import minibatches, progress, seed_everything
from plugin_service.checkpoint import Checkpointer

log = logging.getLogger(__name__)
FeatureFn = Callable[[torch.Tensor], torch.Tensor]
ExtraLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (reconstruction, features) -> scalar added to L1


@dataclass(frozen=True)
class ReconstructionTraining:
    spec: ShadowSpec
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4  # the paper's Adam learning rate
    seed: int = 0
    checkpoint: Path | None = None  # resume file prefix; None trains without checkpoints


@dataclass(frozen=True)
class ValidationScores:
    l1: float
    psnr: float
    ssim: float


Pairs = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # indices -> (images in [0, 1], features)


@torch.no_grad()
def validate_pairs(model: nn.Module, n: int, pairs: Pairs, batch_size: int = 64) -> ValidationScores:
    """Mean per-face L1, PSNR and SSIM of ``model(features)`` against the images, over ``n`` pairs."""
    model.eval()
    l1 = ps = ss = 0.0
    for i in range(0, n, batch_size):
        x, z = pairs(torch.arange(i, min(i + batch_size, n)))
        r = model(z)
        l1 += float(F.l1_loss(r, x, reduction="none").flatten(1).mean(1).sum())
        ps += float(psnr(r, x).sum())
        ss += float(ssim(r, x).sum())
    n = max(n, 1)
    return ValidationScores(l1 / n, ps / n, ss / n)


def validate(model: nn.Module, faces: torch.Tensor, features_of: FeatureFn, device: torch.device,
             batch_size: int = 64) -> ValidationScores:
    """Validation on uint8 faces whose features are computed on the fly."""
    def pairs(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = faces[idx].float().div(255).to(device)
        return x, features_of(x)

    return validate_pairs(model, len(faces), pairs, batch_size)


def fit_reconstructor(cfg: ReconstructionTraining, n: int, pairs: Callable[[torch.Tensor, torch.Generator],
                      tuple[torch.Tensor, torch.Tensor]], validation: Callable[[nn.Module], ValidationScores],
                      device: torch.device, desc: str, model: nn.Module | None = None,
                      extra_loss: ExtraLoss | None = None) -> tuple[nn.Module, ValidationScores]:
    """The one L1 training loop: ``pairs(indices, generator)`` gives each minibatch's (images, features).

    ``model`` continues training a given network (a fine-tune, or a decoder that is not a
    :class:`ShadowSpec` architecture) instead of a fresh ``cfg.spec``. ``extra_loss`` is added to
    the L1 (the shadow's identity term, training/shadow.py).
    """
    generator = seed_everything(cfg.seed)
    model = (build_shadow(cfg.spec) if model is None else model).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt = Checkpointer(cfg.checkpoint) if cfg.checkpoint else None
    start = ckpt.restore(generator, model=model, optimizer=optimizer) if ckpt else 0
    scores = ValidationScores(float("nan"), float("nan"), float("nan"))
    for epoch in range(start, cfg.epochs):
        model.train()
        bar = progress(minibatches(n, cfg.batch_size, generator, drop_last=True),
                       total=max(n // cfg.batch_size, 1), desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}")
        for idx in bar:
            x, z = pairs(idx, generator)
            recon = model(z)
            loss = F.l1_loss(recon, x)
            if extra_loss is not None:
                loss = loss + extra_loss(recon, z)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        scores = validation(model)
        log.info("%s epoch %d/%d: val L1 %.4f, PSNR %.2f dB, SSIM %.3f", desc, epoch + 1, cfg.epochs,
                 scores.l1, scores.psnr, scores.ssim)
        if ckpt:
            ckpt.save(epoch, generator, model=model, optimizer=optimizer)
    if start >= cfg.epochs:
        scores = validation(model)
    model.eval()
    return model, scores


def train_reconstructor(cfg: ReconstructionTraining, train: FaceSet, val: torch.Tensor, features_of: FeatureFn,
                        device: torch.device, desc: str = "reconstructor",
                        extra_loss: ExtraLoss | None = None) -> tuple[nn.Module, ValidationScores]:
    """Trains ``cfg.spec`` on ``train`` (random flips, features computed on the fly)."""
    def pairs(idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = train.floats(idx)
        flip = torch.rand(len(idx), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
        with torch.no_grad():
            return x, features_of(x)

    return fit_reconstructor(cfg, len(train), pairs, lambda m: validate(m, val, features_of, device), device, desc,
                             extra_loss=extra_loss)
