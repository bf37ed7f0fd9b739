"""`advface train-shadow`: trains the defender's shadow model S and writes a model bundle."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from plugin_service.bundle import Manifest, PGDDefaults, save_bundle
from plugin_service.checkpoint import Checkpointer
from plugin_service.faces import identity_half, load_face_folders
from plugin_service.models.extractor import DEFAULT_SPLIT, Extractor, freeze
from plugin_service.models.recognizer import Recognizer, load_recognizer
from plugin_service.models.shadow import ShadowSpec
from plugin_service.reconstruction import ExtraLoss, ReconstructionTraining, train_reconstructor
from plugin_service.runtime import pick_device
from plugin_service.training.bundle_recognizer import add_recognizer
from plugin_service.training.shadow_settings import ShadowTraining

log = logging.getLogger(__name__)


def load_extractor(weights: Path, split: str = DEFAULT_SPLIT) -> Extractor:
    """E from a recogniser file written here or from a FaceNet state dict, frozen."""
    return extractor_at(load_recognizer(weights), split)


def extractor_at(recognizer: Recognizer, split: str) -> Extractor:
    """The recogniser's E cut at ``split`` (a copy when the split differs), frozen."""
    if recognizer.spec.split == split:
        return freeze(recognizer.extractor)
    extractor = Extractor(split)
    extractor.load_facenet_state(recognizer.extractor.facenet_state())
    return freeze(extractor)


def identity_term(recognizer: Recognizer, weight: float) -> ExtraLoss:
    """``weight`` * (1 - cos(R(E(S(z))), R(z))): the identity AdvFace's round trip loses, as a loss.

    AdvFace stores E(S(z)) + delta, so every bit of identity the shadow's reconstruction drops is
    lost to verification before PGD even starts (5.6 points on the dev pairs with an L1-only
    shadow, MODELS.md). Gradients flow through the frozen E and R into S.
    """
    freeze(recognizer)

    def loss(recon: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            goal = recognizer.head(z)
        return weight * (1 - F.cosine_similarity(recognizer.head(recognizer.extractor(recon)), goal, dim=1)).mean()

    return loss


def train_shadow(cfg: ShadowTraining) -> str:
    """Trains S on ``cfg.data`` and writes the bundle; returns its content hash."""
    device = pick_device(cfg.device)
    recognizer = load_recognizer(cfg.extractor)
    extractor = extractor_at(recognizer, cfg.split).to(device)
    faces = load_face_folders(cfg.data)
    names = identity_half(faces.identities, cfg.half)
    faces = faces.subset(names)
    # Hold out every 20th face for per-epoch validation.
    val_mask = torch.arange(len(faces)) % 20 == 0
    train, val = faces.take((~val_mask).nonzero().flatten()), faces.images[val_mask]
    spec = ShadowSpec(cfg.arch, cfg.width, cfg.depth, *extractor.feature_shape()[:2])
    log.info("training %s shadow (width %d, depth %d) on %d faces of %d identities (%s half), E from %s",
             spec.arch, spec.width, spec.depth, len(train), len(names), cfg.half, cfg.extractor)
    extra = identity_term(recognizer.to(device), cfg.identity_weight) if cfg.identity_weight > 0 else None
    shadow, scores = train_reconstructor(
        ReconstructionTraining(spec, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed, checkpoint=cfg.out),
        train, val, extractor, device, desc=f"shadow {spec.arch}", extra_loss=extra)
    manifest = Manifest(
        split=cfg.split, shadow=spec, feature_shape=extractor.feature_shape(), pgd=PGDDefaults(),
        provenance={
            "command": cfg.command,
            "extractor_source": cfg.extractor.name,
            "shadow_data": f"{'+'.join(d.name for d in cfg.data)} ({cfg.half} half: {len(names)} identities, "
                           f"{len(train)} faces)",
            "shadow_identities": ",".join(names),
            "shadow_epochs": str(cfg.epochs),
            "shadow_seed": str(cfg.seed),
            "shadow_identity_weight": str(cfg.identity_weight),
            "shadow_val_l1": f"{scores.l1:.4f}",
            "shadow_val_psnr": f"{scores.psnr:.2f}",
            "shadow_val_ssim": f"{scores.ssim:.4f}",
        })
    content_hash = save_bundle(cfg.out, manifest, extractor.cpu(), shadow.cpu())
    Checkpointer(cfg.out).remove()
    if cfg.with_recognizer:
        content_hash = add_recognizer(cfg.out, cfg.extractor, cfg.data, device=cfg.device)
    return content_hash
