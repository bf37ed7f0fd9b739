"""`advface finetune-head`: the paper's offline mode as XNN-d, a server-side R that expects protected features.

A protector moves stored features off the manifold R was trained on, which costs verification
accuracy. When the operator can retrain the server side, R is trained on protected features of
public faces while E (on every client) stays frozen. By default it is *distilled* (XNN-d): for
each face, R(protected feature) learns to point where the clean R's embedding of the clean face
points (``target="clean"``), or where the teacher's (dlib's, centred) embedding points
(``target="teacher"``); ``target="identity"`` keeps the older cross-entropy over identities.

Each batch holds the protected features AND the clean features of the same faces (unless
``clean_mix`` is off), because at verification time the head sees both: stored, protected
features on the enrolled side and fresh, clean probes on the other. The protected features are
computed once before training (PGD dominates the cost) and kept as float16 in memory:
0.76 MB per face, about 2.9 GB for the 3.8k shared public faces.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.bundle import Bundle, default_recognizer_path, load_bundle
from plugin_service.evaluation.caches import CachedPass, PassCache, tensor_digest
from plugin_service.evaluation.config import EvaluationError
from plugin_service.evaluation.data import batch_order, require_same_extractor
from plugin_service.evaluation.finetune_settings import TARGETS, HeadFinetuning
from plugin_service.evaluation.passes import make_protector, protect_dataset
from plugin_service.faces import identity_half, load_face_folders
from plugin_service.models.extractor import batch_norms, freeze
from plugin_service.models.recognizer import EMBEDDING_SCALE, Recognizer, load_recognizer
from plugin_service.protect.base import Protector
from plugin_service.runtime import default_cache_dir, minibatches, pick_device, progress, seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    recognizer: Recognizer
    faces: int
    identities: int
    loss: float  # mean training loss of the last epoch
    fit: float  # last epoch, protected features: identity accuracy (target identity) or mean cosine to the target
    fit_name: str


def _teacher_targets(images: torch.Tensor) -> torch.Tensor:
    """The judge's embeddings of the faces, centred (see training.distill), from the shared cache."""
    from plugin_service.judge import EmbeddingCache, load_judge
    from plugin_service.runtime import judge_cache_dir

    judge = load_judge()
    raw = EmbeddingCache(judge_cache_dir(), judge.name).embed(images, judge.embed, desc="teacher")
    return raw - raw.mean(dim=0, keepdim=True)


def _protected_features(cfg: HeadFinetuning, bundle: Bundle, images: torch.Tensor, protector: Protector,
                        device: torch.device) -> torch.Tensor:
    """The protector's features of every face, from the pass cache when an earlier run made the same ones.

    PGD is nearly all of a head's cost (about 20 min for 2,000 faces here), and heads that differ
    only in their training (target, epochs, learning rate) read the same features.
    """
    order = batch_order(len(images), cfg.seed)
    root = cfg.cache_dir or default_cache_dir()
    cache = PassCache(root / "passes" if cfg.resume else None)
    key = cache.key({"use": "finetune-head", "bundle": bundle.content_hash, "protector": cfg.protector,
                     "params": protector.params(), "faces": tensor_digest(images), "order": tensor_digest(order),
                     "batch_size": cfg.batch_size, "seed": cfg.seed, "channels_last": cfg.channels_last,
                     "device": device.type}) if cache.enabled else None
    done = cache.load(key) if key is not None else None
    if done is not None and done.features is not None and len(done.features) == len(images):
        log.info("%s features of %d faces: from the cache (made by an earlier run)", cfg.protector, len(images))
        return done.features
    protected = protect_dataset(images, bundle.extractor, protector, order, cfg.batch_size, device,
                                desc=f"{cfg.protector} features")
    if key is not None:
        cache.save(key, CachedPass({"use": "finetune-head", "faces": len(images)}, {}, protected))
    return protected


def finetune_head(cfg: HeadFinetuning) -> FinetuneResult:
    """Fine-tunes ``cfg.recognizer``'s head on protected features of ``cfg.data`` and writes ``cfg.out``."""
    generator = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    bundle = load_bundle(cfg.bundle).to(device)
    recognizer = cfg.recognizer or default_recognizer_path()
    model = load_recognizer(recognizer).to(device)
    require_same_extractor(model, bundle)
    if cfg.target not in TARGETS:
        raise EvaluationError(f"unknown fine-tuning target {cfg.target!r}; choose one of {', '.join(TARGETS)}")
    faces = load_face_folders(cfg.data, limit_per_identity=cfg.limit_per_identity)
    faces = faces.subset(identity_half(faces.identities, cfg.half))
    protector = make_protector(cfg.protector, bundle, cfg.params, generator=torch.Generator().manual_seed(cfg.seed),
                               channels_last=cfg.channels_last)
    log.info("fine-tuning the %s head on %s features of %d faces of %d identities (%s)", model.spec.arch,
             cfg.protector, len(faces), len(faces.identities), device)
    protected = _protected_features(cfg, bundle, faces.images, protector, device)
    extractor = freeze(model.extractor)
    reference = freeze(copy.deepcopy(model.head))  # the clean R, for target "clean"
    teacher = _teacher_targets(faces.images) if cfg.target == "teacher" else None
    # Identity accuracy means nothing when the head is distilled (one face per identity is typical):
    # those runs report how close R(protected) comes to its target instead.
    classify = cfg.target == "identity"
    fit_name = "identity accuracy" if classify else "mean cosine to the target"
    classifier = nn.Linear(model.embedding_dim, len(faces.identities)).to(device) if classify else None
    params = list(model.head.parameters()) + (list(classifier.parameters()) if classifier is not None else [])
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_mean, fit = float("nan"), float("nan")
    for epoch in range(cfg.epochs):
        model.head.train()
        if cfg.freeze_batch_norm:
            for norm in batch_norms(model.head):
                norm.eval()
        total = 0
        loss_sum = fit_sum = 0.0
        bar = progress(minibatches(len(faces), cfg.batch_size, generator, drop_last=True),
                       total=max(len(faces) // cfg.batch_size, 1), desc=f"head epoch {epoch + 1}/{cfg.epochs}")
        for idx in bar:
            y = faces.labels[idx].to(device)
            clean = None  # E of the clean faces: the mixed-in inputs, and the clean R's input for target "clean"
            if cfg.clean_mix or cfg.target == "clean":
                with torch.no_grad():
                    clean = extractor(faces.floats(idx).to(device))
            inputs = [protected[idx].float().to(device), *([clean] if cfg.clean_mix else [])]
            embedding = model.head(torch.cat(inputs))
            if classifier is not None:
                logits = classifier(embedding * EMBEDDING_SCALE)
                loss = F.cross_entropy(logits, y.repeat(len(inputs)), label_smoothing=cfg.label_smoothing)
                fit_sum += float((logits[: len(idx)].argmax(1) == y).sum())
            else:
                with torch.no_grad():
                    goal = teacher[idx].to(device) if teacher is not None else reference(clean)
                goal = F.normalize(goal.float(), dim=1).repeat(len(inputs), 1)
                cosine = F.cosine_similarity(embedding, goal, dim=1)
                loss = (1 - cosine).mean()
                fit_sum += float(cosine[: len(idx)].detach().sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += len(idx)
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", fit=f"{fit_sum / total:.3f}")
        loss_mean, fit = loss_sum / max(total, 1), fit_sum / max(total, 1)
        log.info("head epoch %d/%d: loss %.3f, %s on protected features %.3f", epoch + 1, cfg.epochs, loss_mean,
                 fit_name, fit)
    model.eval()
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    model.cpu().save(cfg.out, {
        "finetuned_from": recognizer.name, "finetune_bundle": bundle.version, "finetune_protector": cfg.protector,
        "finetune_params": json.dumps(protector.params(), sort_keys=True), "finetune_data": str(cfg.data),
        "finetune_faces": str(len(faces)), "finetune_epochs": str(cfg.epochs), "finetune_seed": str(cfg.seed),
        "finetune_clean_mix": str(cfg.clean_mix), "finetune_target": cfg.target, "finetune_lr": str(cfg.lr),
        "finetune_freeze_batch_norm": str(cfg.freeze_batch_norm),
    })
    return FinetuneResult(model, len(faces), len(faces.identities), loss_mean, fit, fit_name)
