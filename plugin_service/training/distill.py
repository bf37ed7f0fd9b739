"""`advface train-recognizer --teacher dlib`: E + R distilled from a strong pretrained recogniser.

Trained from scratch on 3.8k labelled faces, the recogniser reached 76.5 % on the dev pairs;
a pretrained teacher (dlib's ResNet, 99.38 % on LFW) knows identity far better but works on
images, not on E's features, so it cannot be the backend's recogniser. It can teach one: the
student R(E(x)) learns to point where the teacher's embedding of x points (cosine loss on unit
vectors). That needs no labels, so every public face helps, and the teacher runs once per face
(its embeddings are cached on disk); the student sees augmented copies (flip, scale/shift
jitter, colour) against the clean face's target, which also teaches it to ignore them.

An identity cross-entropy on folder labels can be added (``ce_weight``) where labels exist.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.checkpoint import Checkpointer
from plugin_service.faces import FaceSet, load_face_folders
from plugin_service.judge import EmbeddingCache, load_judge
from plugin_service.models.recognizer import Recognizer, load_recognizer
from plugin_service.names import TEACHERS
from plugin_service.runtime import judge_cache_dir, minibatches, pick_device, progress, seed_everything
from plugin_service.training.recognizer import pairs_report
from plugin_service.training.recognizer_settings import DistillTraining
from plugin_service.training.stage_average import average_recognizers, recalibrate_batch_norm

log = logging.getLogger(__name__)
Teacher = Callable[[torch.Tensor], torch.Tensor]  # uint8 faces (N, 3, 160, 160) -> (N, D)


def build_teacher(name: str) -> tuple[str, Teacher]:
    """(cache name, embedder) of a teacher; a missing install raises JudgeNotInstalled naming the fix."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")
    judge = load_judge()
    return judge.name, judge.embed


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per face: flip, scale 0.9-1.1, shift up to 6 px, rotation up to 5 degrees, colour jitter."""
    n = images.shape[0]
    u = torch.rand(n, 8, generator=generator)
    scale = 0.9 + 0.2 * u[:, 0]
    angle = (u[:, 1] - 0.5) * math.radians(10)
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    tx, ty = (u[:, 3] - 0.5) * 12 / 80, (u[:, 4] - 0.5) * 12 / 80  # grid units: 80 px = 1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness = (0.8 + 0.4 * u[:, 5]).view(n, 1, 1, 1).to(images)
    contrast = (0.8 + 0.4 * u[:, 6]).view(n, 1, 1, 1).to(images)
    saturation = (0.7 + 0.6 * u[:, 7]).view(n, 1, 1, 1).to(images)
    grey = out.mean(dim=1, keepdim=True)
    out = grey + (out - grey) * saturation
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean).mul(brightness).clamp(0, 1)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cos between student and (centred) teacher embeddings, both normalised here."""
    return (1 - F.cosine_similarity(student, F.normalize(teacher, dim=1), dim=1)).mean()


def _initial_model(cfg: DistillTraining) -> Recognizer:
    """A fresh student, or --init's weights: a warm restart that spends more epochs on a finished run."""
    if cfg.init is None:
        return Recognizer(cfg.spec)
    model = load_recognizer(cfg.init)
    if model.spec != cfg.spec:
        raise ValueError(f"--init {cfg.init} is a {model.spec}, not the {cfg.spec} asked for; "
                         "give the same --arch, --split, --width and --embedding-dim")
    log.info("starting from %s", cfg.init)
    return model


def distill_recognizer(cfg: DistillTraining, teacher: Teacher | None = None,
                       teacher_name: str | None = None) -> tuple[Recognizer, dict[str, dict[str, float]]]:
    """Trains E + R on the teacher's embeddings, stage by stage; returns the student and its pairs reports.

    Each warm restart (``--restarts``) is exactly a new run with ``--init`` set to the previous
    stage's weights file: it reseeds, starts a fresh optimiser and schedule, and reads the weights
    back from that file. So one command gives the weights the chained commands give, and a rerun
    skips every stage whose file exists. With restarts, --out is the mean of the last
    ``average_stages`` stages (one: the last stage itself); ``bn_faces`` then measures BatchNorm's
    statistics again (``stage_average.py``). ``teacher`` replaces the named one (tests use a cheap
    deterministic function).
    """
    cfg.validate()
    if teacher is None:
        teacher_name, teacher = build_teacher(cfg.teacher)
    assert teacher_name is not None, "a custom teacher needs a name for its embedding cache"
    stages = cfg.stages
    device = pick_device(cfg.device)
    faces = load_face_folders(cfg.data, cfg.limit_per_identity)
    cache = EmbeddingCache(cfg.cache_dir or judge_cache_dir(), teacher_name)
    raw = cache.embed(faces.images, teacher, desc=f"teacher {teacher_name}")
    # Centred: every dlib descriptor shares a large common component (two strangers' raw vectors
    # have cosine ~0.8), so without centring a student that outputs the mean direction already
    # scores cos 0.8 and learns little identity. Distances, and so the teacher's decisions, are unchanged.
    targets = raw - raw.mean(dim=0, keepdim=True)
    log.info("distilling %s (%s head, width %d) from %s on %d faces of %d identities (%s), %d stage(s)",
             cfg.out.name, cfg.spec.arch, cfg.spec.width, teacher_name, len(faces), len(faces.identities), device,
             len(stages))
    init = cfg.init
    for number, (epochs, lr, out) in enumerate(stages, 1):
        stage = replace(cfg, epochs=epochs, lr=lr, out=out, init=init)
        init = out
        if out != cfg.out and out.is_file():
            log.info("stage %d/%d: %s exists, so it is not trained again", number, len(stages), out)
            continue
        label = f"stage {number}/{len(stages)}, " if len(stages) > 1 else ""
        model = _train_stage(stage, faces, targets, device, label)
        if out != cfg.out:
            _save(model, stage, teacher_name, len(faces), {})
    if len(stages) > 1:
        averaged = [out for _, _, out in stages[-cfg.average_stages:]]
        log.info("--out is the mean of %s", ", ".join(p.name for p in averaged))
        model = average_recognizers(averaged)
    if cfg.bn_faces > 0:
        recalibrate_batch_norm(model, faces, cfg.bn_faces, cfg.batch_size, cfg.seed, device)
    model.to(device).eval()
    reports = {str(p): pairs_report(model, p, root, device) for p, root in cfg.report}
    for name, r in reports.items():
        log.info("%s: %s", name, json.dumps(r))
    _save(model, cfg, teacher_name, len(faces), reports)
    return model, reports


def _train_stage(cfg: DistillTraining, faces: FaceSet, targets: torch.Tensor, device: torch.device,
                 label: str) -> Recognizer:
    """One run of the recipe (seed, fresh optimiser, warm-up + cosine schedule), resumable from its checkpoint."""
    generator = seed_everything(cfg.seed)
    # channels_last: about 25 % faster convolutions on CPU (measured here), same results.
    model = _initial_model(cfg).to(device, memory_format=torch.channels_last)
    # A learned map when the student's embedding size differs from the teacher's (facenet: 512 vs 128).
    adapter: nn.Module = (nn.Identity() if model.embedding_dim == targets.shape[1]
                          else nn.Linear(model.embedding_dim, targets.shape[1], bias=False)).to(device)
    classifier = nn.Linear(model.embedding_dim, len(faces.identities)).to(device)
    params = [*model.parameters(), *adapter.parameters(), *(classifier.parameters() if cfg.ce_weight > 0 else [])]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(faces) // cfg.batch_size
    total = max(1, cfg.epochs * steps_per_epoch)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ckpt = Checkpointer(cfg.out)
    start = ckpt.restore(generator, model=model, adapter=adapter, classifier=classifier, optimizer=optimizer,
                         scheduler=scheduler)
    for epoch in range(start, cfg.epochs):
        model.train()
        seen, loss_sum = 0, 0.0
        bar = progress(minibatches(len(faces), cfg.batch_size, generator, drop_last=True),
                       total=steps_per_epoch, desc=f"distil {label}epoch {epoch + 1}/{cfg.epochs}")
        for idx in bar:
            x = augment(faces.floats(idx), generator).to(device).contiguous(memory_format=torch.channels_last)
            embedding = model(x)
            loss = cosine_loss(adapter(embedding), targets[idx].to(device))
            if cfg.ce_weight > 0:
                loss = loss + cfg.ce_weight * F.cross_entropy(classifier(embedding * 16.0), faces.labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        ckpt.save(epoch, generator, model=model, adapter=adapter, classifier=classifier, optimizer=optimizer,
                  scheduler=scheduler)
        entry = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1)}
        if cfg.monitor is not None:
            entry["monitor_accuracy"] = pairs_report(model, *cfg.monitor, device)["accuracy"]
        log.info("%sepoch %d/%d: %s", label, epoch + 1, cfg.epochs, json.dumps(entry))
    return model


def _save(model: Recognizer, cfg: DistillTraining, teacher_name: str, faces: int,
          reports: dict[str, dict[str, float]]) -> None:
    """Writes ``cfg.out`` with what made it (a stage's epochs, lr and --init, or the whole command) and reports."""
    extra = {"teacher": teacher_name, "data": ",".join(str(d) for d in cfg.data), "epochs": str(cfg.epochs),
             "seed": str(cfg.seed), "init": str(cfg.init or ""), "faces": str(faces),
             "training": json.dumps(asdict(cfg), default=str), "reports": json.dumps(reports)}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    model.cpu().save(cfg.out, extra)
