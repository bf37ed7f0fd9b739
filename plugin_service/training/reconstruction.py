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

from plugin_service.evaluation.metrics import psnr, ssim
from plugin_service.faces import FaceSet
from plugin_service.models.shadow import ShadowSpec, build_shadow
from plugin_service.training.loop import Checkpointer, minibatches, progress, seed_everything

log = logging.getLogger(__name__)
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


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


@torch.no_grad()
def validate(model: nn.Module, faces: torch.Tensor, features_of: FeatureFn, device: torch.device,
             batch_size: int = 64) -> ValidationScores:
    model.eval()
    l1 = ps = ss = 0.0
    for i in range(0, len(faces), batch_size):
        x = faces[i : i + batch_size].float().div(255).to(device)
        r = model(features_of(x))
        l1 += float(F.l1_loss(r, x, reduction="sum")) / x[0].numel()
        ps += float(psnr(r, x).sum())
        ss += float(ssim(r, x).sum())
    n = len(faces)
    return ValidationScores(l1 / n, ps / n, ss / n)


def train_reconstructor(cfg: ReconstructionTraining, train: FaceSet, val: torch.Tensor, features_of: FeatureFn,
                        device: torch.device, desc: str = "reconstructor") -> tuple[nn.Module, ValidationScores]:
    """Trains ``cfg.spec`` on ``train``; returns the eval-mode network and its last validation scores."""
    generator = seed_everything(cfg.seed)
    model = build_shadow(cfg.spec).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt = Checkpointer(cfg.checkpoint) if cfg.checkpoint else None
    start = ckpt.restore(generator, model=model, optimizer=optimizer) if ckpt else 0
    scores = ValidationScores(float("nan"), float("nan"), float("nan"))
    for epoch in range(start, cfg.epochs):
        model.train()
        bar = progress(minibatches(len(train), cfg.batch_size, generator, drop_last=True),
                       total=len(train) // cfg.batch_size, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}")
        for idx in bar:
            x = train.floats(idx)
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
            with torch.no_grad():
                z = features_of(x)
            loss = F.l1_loss(model(z), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(l1=f"{loss.item():.4f}")
        scores = validate(model, val, features_of, device)
        log.info("%s epoch %d/%d: val L1 %.4f, PSNR %.2f dB, SSIM %.3f", desc, epoch + 1, cfg.epochs,
                 scores.l1, scores.psnr, scores.ssim)
        if ckpt:
            ckpt.save(epoch, generator, model=model, optimizer=optimizer)
    if start >= cfg.epochs and len(val):
        scores = validate(model, val, features_of, device)
    model.eval()
    return model, scores
