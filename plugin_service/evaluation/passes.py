"""Protecting whole datasets the way the server would, and one streamed pass of a protector over the verification faces.

Protectors as the evaluation builds them, and whole datasets protected the way a server would.

Three things differ from the registry the service uses: AdvFace may run with a shadow model other
than the bundle's (the transferability matrix, the adaptive attacker's own copy of the defence),
an eps of 0 skips the PGD loop, which is exactly equivalent (every step is projected back
to delta = 0) and saves 40 shadow passes per batch in the trade-off sweep, and ``channels_last``
runs the engine's channels-last PGD (the serving engine's ``--channels-last``: the same function up
to floating-point reordering, about 1.5x faster on CPU), which makes LFW-scale runs affordable.

One pass over the verification faces under one protector: everything the tables need, streamed.

For each batch (taken in a fixed, identity-mixing order, ``batch_size`` faces per protector call
as the server batches them) the pass computes z = E(x), the stored feature protector(z), what
every attacker reconstructs from it, and what every recogniser head makes of it. Only per-face
numbers and embeddings are kept, and the features of the tiers' privacy faces: one protected copy
of LFW's 7,701 faces is six gigabytes, and the sweep makes a dozen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from plugin_service.bundle import Bundle
from plugin_service.image_metrics import mse, psnr, ssim
from plugin_service.models.extractor import FACE_SIZE
from plugin_service.models.recognizer import Recognizer
from plugin_service.protect.base import Protection, Protector
from plugin_service.protect.pgd import AdvFace
from plugin_service.protect.pgd_fast import FastAdvFace
from plugin_service.protect.registry import ProtectorParams, build_protector
from plugin_service.protect.shadow_step import ShadowStep
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


Source = Callable[[torch.Tensor, torch.Tensor], Protection]  # (face indices, faces in [0, 1]) -> what is stored


def live(extractor: nn.Module, protector: Protector) -> Source:
    """The server's path: protector(E(x)). The alternative is a replay of stored features (feature_store)."""
    return lambda idx, x: protector(extractor(x))


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
def run_pass(images: torch.Tensor, order: torch.Tensor, protect: Source,
             attackers: Mapping[str, nn.Module], heads: Mapping[str, Recognizer], recognizer: Recognizer,
             batch_size: int, device: torch.device, examples: torch.Tensor, desc: str = "pass",
             keep: torch.Tensor | None = None) -> PassOutputs:
    """Streams ``images`` (uint8) through ``protect`` (E and a protector, or a replay), every attacker and every head.

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
        result = protect(idx, x)
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
