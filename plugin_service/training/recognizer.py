"""`advface train-recognizer`: trains E + a server-side head as an identity classifier.

Pretrained FaceNet weights cannot be downloaded on the build machines, so the recogniser (and
with it E) is trained here on the public faces: cross-entropy over identities on top of the
unit embedding, Adam with the paper's per-epoch decay (x0.94), flips and small shifts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.checkpoint import Checkpointer
from plugin_service.faces import FaceSet, load_face_folders
from plugin_service.models.recognizer import EMBEDDING_SCALE, Recognizer, embed_images
from plugin_service.pairs import load_eval_faces
from plugin_service.runtime import minibatches, pick_device, progress, seed_everything
from plugin_service.training.recognizer_settings import RecognizerTraining
from plugin_service.verification import verify

log = logging.getLogger(__name__)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a shift of up to 8 px (reflect-padded), per face."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (8, 8, 8, 8), mode="reflect")
    dx, dy = (torch.randint(0, 17, (2, n), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + 160, dx[i] : dx[i] + 160] for i in range(n)])


def pairs_report(model: Recognizer, pairs: Path, root: Path, device: torch.device) -> dict[str, float]:
    """10-fold accuracy, fold spread and TAR@FAR of ``model`` on an LFW-format pairs file, as `evaluate` measures it."""
    faces = load_eval_faces(root, pairs)
    model.eval()
    emb = embed_images(model, faces.images, device, desc=f"embedding {Path(pairs).name}")
    r = verify(emb, emb, faces.pairs)
    return {"pairs": len(faces.pairs), "accuracy": r.accuracy, "std": r.std,
            **{f"tar@far={k}": v for k, v in r.tar_at_far.items()}}


def train_recognizer(cfg: RecognizerTraining) -> Recognizer:
    generator = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    faces: FaceSet = load_face_folders(cfg.data)
    log.info("training %s recogniser on %d faces of %d identities (%s)", cfg.spec.arch, len(faces), len(faces.identities), device)
    model = Recognizer(cfg.spec).to(device)
    classifier = nn.Linear(model.embedding_dim, len(faces.identities)).to(device)
    params = list(model.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    ckpt = Checkpointer(cfg.out)
    start = ckpt.restore(generator, model=model, classifier=classifier, optimizer=optimizer, scheduler=scheduler)
    for epoch in range(start, cfg.epochs):
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        bar = progress(minibatches(len(faces), cfg.batch_size, generator, drop_last=True),
                       total=len(faces) // cfg.batch_size, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        for idx in bar:
            x = augment(faces.floats(idx), generator).to(device)
            y = faces.labels[idx].to(device)
            logits = classifier(model(x) * EMBEDDING_SCALE)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += len(idx)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
        scheduler.step()
        ckpt.save(epoch, generator, model=model, classifier=classifier, optimizer=optimizer, scheduler=scheduler)
        log.info("epoch %d/%d: loss %.3f, train accuracy %.3f", epoch + 1, cfg.epochs, loss_sum / total, correct / total)
    model.eval()
    extra = {"data": ",".join(str(d) for d in cfg.data), "epochs": str(cfg.epochs), "seed": str(cfg.seed)}
    if cfg.pairs is not None:
        acc = pairs_report(model, cfg.pairs, cfg.pairs_root or cfg.pairs.parent, device)["accuracy"]
        extra["verification_accuracy"] = f"{acc:.4f}"
        log.info("verification accuracy on %s: %.4f", cfg.pairs, acc)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    model.cpu().save(cfg.out, extra)
    return model
