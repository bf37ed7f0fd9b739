"""One pass over the verification faces under one protector: everything the tables need, streamed.

For each batch (taken in a fixed, identity-mixing order, ``batch_size`` faces per protector call
as the server batches them) the pass computes z = E(x), the stored feature protector(z), what
every attacker reconstructs from it, and what every recogniser head makes of it. Only per-face
numbers and embeddings are kept, never the features themselves: one protected copy of a thousand
faces is a gigabyte, and the sweep makes a dozen.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from plugin_service.image_metrics import mse, psnr, ssim
from plugin_service.models.extractor import FACE_SIZE
from plugin_service.models.recognizer import Recognizer
from plugin_service.protect.base import Protector
from plugin_service.runtime import progress


@dataclass
class AttackOutputs:
    """One attacker's per-face results within a pass."""

    psnr: np.ndarray  # (N,)
    ssim: np.ndarray
    mse: np.ndarray
    embeddings: torch.Tensor  # (N, D): the primary recogniser's embedding of each reconstruction
    examples: torch.Tensor  # (K, 3, 160, 160): reconstructions of the example faces


@dataclass
class PassOutputs:
    """Per-face results of one protector over the verification faces."""

    attacks: dict[str, AttackOutputs]
    feature_embeddings: dict[str, torch.Tensor]  # recogniser name -> (N, D) head(stored feature)
    perturbation_norm: np.ndarray  # (N,)
    shadow_loss_before: np.ndarray | None = None
    shadow_loss_after: np.ndarray | None = None
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    features: torch.Tensor | None = None  # (K, C, H, W) float16 stored features of the ``keep`` faces, in its order


@torch.no_grad()
def run_pass(images: torch.Tensor, order: torch.Tensor, extractor: nn.Module, protector: Protector,
             attackers: Mapping[str, nn.Module], heads: Mapping[str, Recognizer], recognizer: Recognizer,
             batch_size: int, device: torch.device, examples: torch.Tensor, desc: str = "pass",
             keep: torch.Tensor | None = None) -> PassOutputs:
    """Streams ``images`` (uint8) through E, ``protector``, every attacker and every head.

    ``order`` fixes which faces share a protector batch; ``examples`` are face indices whose
    reconstructions are kept for the figure. ``recognizer`` embeds reconstructed images for
    the replay attack; ``heads`` embed the stored features for verification. The stored features
    of the ``keep`` faces (indices) are returned, so the attacker tiers can attack exactly what
    this pass stored without keeping all of LFW's (six gigabytes per protector).
    """
    start = time.perf_counter()
    n = len(images)
    per_face = {name: {m: np.zeros(n) for m in ("psnr", "ssim", "mse")} for name in attackers}
    recon_emb: dict[str, torch.Tensor] = {}
    feat_emb: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {name: torch.zeros(len(examples), 3, FACE_SIZE, FACE_SIZE) for name in attackers}
    where = {int(face): k for k, face in enumerate(examples.tolist())}
    norms = np.zeros(n)
    before, after = np.full(n, np.nan), np.full(n, np.nan)
    kept_features: torch.Tensor | None = None
    slot = torch.full((n,), -1, dtype=torch.long)
    if keep is not None:
        slot[keep] = torch.arange(len(keep))
    batches = order.split(batch_size)
    for idx in progress(batches, total=len(batches), desc=desc):
        x = images[idx].float().div(255.0).to(device)
        result = protector(extractor(x))
        stored = result.features
        if keep is not None:
            if kept_features is None:
                kept_features = torch.empty((len(keep), *stored.shape[1:]), dtype=torch.float16)
            mine = slot[idx] >= 0
            kept_features[slot[idx][mine]] = stored[mine.to(stored.device)].to(torch.float16).cpu()
        rows = idx.numpy()
        norms[rows] = result.perturbation_norm.float().cpu().numpy()
        if result.shadow_loss_before is not None and result.shadow_loss_after is not None:
            before[rows] = result.shadow_loss_before.float().cpu().numpy()
            after[rows] = result.shadow_loss_after.float().cpu().numpy()
        for name, head in heads.items():
            emb = head.embed_features(stored).float().cpu()
            feat_emb.setdefault(name, torch.zeros(n, emb.shape[1]))[idx] = emb
        for name, attacker in attackers.items():
            recon = attacker(stored).float()
            per_face[name]["psnr"][rows] = psnr(recon, x).cpu().numpy()
            per_face[name]["ssim"][rows] = ssim(recon, x).cpu().numpy()
            per_face[name]["mse"][rows] = mse(recon, x).cpu().numpy()
            emb = recognizer(recon.clamp(0, 1)).float().cpu()
            recon_emb.setdefault(name, torch.zeros(n, emb.shape[1]))[idx] = emb
            for j, face in enumerate(idx.tolist()):
                if face in where:
                    kept[name][where[face]] = recon[j].clamp(0, 1).cpu()
    attacks = {name: AttackOutputs(per_face[name]["psnr"], per_face[name]["ssim"], per_face[name]["mse"],
                                   recon_emb[name], kept[name]) for name in attackers}
    has_shadow = not np.isnan(before).all()
    return PassOutputs(attacks, feat_emb, norms, before if has_shadow else None, after if has_shadow else None,
                       seconds=time.perf_counter() - start, features=kept_features)
