"""Attacker tiers: every protector, and the embedding-only floor, against attackers of growing knowledge.

| tier | attacker holds | attack |
|---|---|---|
| A0 | public faces, E | decoder trained on clean features |
| A1 | + the protector's code, own shadow, R | decoder trained on protected features; A0 fine-tuned on them |
| A2 | E's weights (or queries) | optimise an image until E(image) matches the stored feature: white-box E, a surrogate E fitted from queries, and starting from A0's output |
| A3 | + an independent recogniser | each reconstruction judged by it; a linkage student (MLP, and a closed-form linear map) from R(stored value) to its embedding |
| floor | e = R(z) only | the same decoder, inversion and linkage on e |
| nothing stored | public faces | the mean public face for every face: what any attack must beat |

Every attacker trains on the ATTACKER half of ``--attack-data``, disjoint in identity from the
defender's shadow data and from the evaluation faces. What the attacker protects its own faces
with is its own copy of the defence: its own shadow for advface (it cannot have the defender's),
the real R and start feature for resynth (they ship with the backend it stole from), the same
code with its own noise for random and dp.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.bundle import Bundle
from plugin_service.evaluation.attackers import (
    EmbeddingDecoder,
    TrainedNet,
    attacker_recipe,
    shadow_recipe,
    train_on_features,
)
from plugin_service.evaluation.attacks import (
    InversionSettings,
    embedding_objective,
    feature_objective,
    fit_linear_link,
    fit_surrogate_extractor,
    invert,
    predict,
    train_linkage_student,
)
from plugin_service.evaluation.caches import ModelCache
from plugin_service.evaluation.config import EvaluationConfig
from plugin_service.evaluation.data import AttackData, batch_order, fingerprint, select_privacy_faces
from plugin_service.evaluation.passes import make_protector, store_dataset
from plugin_service.evaluation.results import Tiers
from plugin_service.evaluation.scoring import (
    FLOOR,
    PRIOR,
    TIERS,
    Gallery,
    margins,
    rank1,
    same_image_rate,
    summarize_tiers,
)
from plugin_service.faces import FaceSet, list_images, load_face
from plugin_service.image_metrics import psnr, ssim
from plugin_service.judge import DlibFaceRecognizer, EmbeddingCache
from plugin_service.models.extractor import freeze
from plugin_service.models.recognizer import Recognizer
from plugin_service.pairs import EvalFaces
from plugin_service.protect.base import Protector
from plugin_service.protect.registry import ProtectorParams
from plugin_service.reconstruction import ReconstructionTraining, fit_reconstructor, validate_pairs
from plugin_service.runtime import progress

log = logging.getLogger(__name__)
StoreFn = Callable[[torch.Tensor], torch.Tensor]  # images in [0, 1] (N, 3, 160, 160) -> stored values


@dataclass
class TierContext:
    """What every tier shares: the faces under attack, the judge's view of them, the attacker's data."""

    cfg: EvaluationConfig
    bundle: Bundle
    recognizer: Recognizer
    judge: DlibFaceRecognizer
    judge_cache: EmbeddingCache
    images: torch.Tensor  # (N, 3, 160, 160) uint8: the privacy faces
    names: list[str]
    originals_judge: torch.Tensor  # (N, 128)
    originals_embedding: torch.Tensor  # (N, D) project recogniser
    gallery: Gallery
    attacker: FaceSet  # the attacker's training faces
    attacker_judge: torch.Tensor  # (M, 128)
    a0: TrainedNet
    surrogate: nn.Module
    threshold: float
    device: torch.device

    def judge_embed(self, images: torch.Tensor, desc: str) -> torch.Tensor:
        return self.judge_cache.embed(to_uint8(images), self.judge.embed, desc=desc)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def build_gallery(root: Path, names: list[str], paths: list[Path], judge_embed: Callable[[torch.Tensor], torch.Tensor],
                  distractors: int = 0, seed: int = 0) -> Gallery:
    """One photo per identity that is none of the probes, from the evaluation folder.

    ``distractors`` more identities of the same folder (seeded choice, one photo each) make rank-1
    harder to reach by luck: chance falls to 1 / gallery size, as in an open identification search.
    """
    probes = {Path(p) for p in paths}
    probe_set = set(names)
    probe_names = sorted(probe_set)
    others = sorted(d.name for d in Path(root).iterdir() if d.is_dir() and d.name not in probe_set)
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed)).tolist()
    candidates = probe_names + [others[i] for i in order[:distractors]]
    chosen: dict[str, Path] = {}
    for name in candidates:
        for candidate in list_images(Path(root) / name):
            if candidate not in probes:
                chosen[name] = candidate
                break
    identities = sorted(chosen)
    if not identities:
        return Gallery(torch.zeros(0, 128), [])
    images = torch.stack([to_uint8(load_face(chosen[n])) for n in progress(identities, desc="gallery", unit="face")])
    return Gallery(judge_embed(images), identities)


@torch.no_grad()
def decode_all(model: nn.Module, stored: torch.Tensor, device: torch.device, batch_size: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([model(stored[i : i + batch_size].float().to(device)).float().clamp(0, 1).cpu()
                      for i in range(0, len(stored), batch_size)])


class TierRunner:
    """Runs every tier against one stored set and scores the reconstructions."""

    def __init__(self, ctx: TierContext) -> None:
        self.ctx = ctx
        self.rows: list[dict[str, Any]] = []
        self.linkage: dict[str, float] = {}
        self.linkage_by_map: dict[str, dict[str, float]] = {}
        self.examples: dict[str, dict[str, torch.Tensor]] = {}

    def score(self, protector: str, tier: str, attack: str, recon: torch.Tensor, rows: slice | None = None) -> None:
        c = self.ctx
        rows = rows or slice(0, len(recon))
        x = c.images[rows].float().div(255)
        names = c.names[rows]
        judged_n = min(len(recon), c.cfg.judge_faces or len(recon))  # dlib costs ~70 ms a face on one core
        judged = c.judge_embed(recon[:judged_n], desc=f"judge {protector} {attack}")
        original = c.originals_judge[rows][:judged_n]
        with torch.no_grad():
            emb = torch.cat([c.recognizer(recon[i : i + 64].to(c.device)).float().cpu() for i in range(0, len(recon), 64)])
        srra = float((F.cosine_similarity(emb, c.originals_embedding[rows], dim=1) >= c.threshold).float().mean())
        # per chunk: SSIM's filtered maps of a thousand 160x160 faces at once take gigabytes
        chunks = [(recon[i : i + 64], x[i : i + 64]) for i in range(0, len(recon), 64)]
        row = {"protector": protector, "tier": tier, "attack": attack, "faces": len(recon), "judged_faces": judged_n,
               "ssim": float(torch.cat([ssim(r, o) for r, o in chunks]).mean()),
               "psnr": float(torch.cat([psnr(r, o) for r, o in chunks]).mean()),
               "dlib_same": same_image_rate(judged, original),
               "dlib_rank1": rank1(judged, names[:judged_n], c.gallery), "srra": srra}
        log.info("%s %s %s: SSIM %.3f PSNR %.2f dlib same %.3f rank-1 %.3f SRRA %.3f", protector, tier, attack,
                 row["ssim"], row["psnr"], row["dlib_same"], row["dlib_rank1"], row["srra"])
        self.rows.append(row)
        k = min(c.cfg.examples, len(recon))
        self.examples.setdefault(protector, {})[f"{tier} {attack}"] = recon[:k]

    def run(self, protector: str, defender: StoreFn, attacker: StoreFn, floor: bool,
            stored: torch.Tensor | None = None) -> None:
        """All tiers against ``protector``; ``stored`` is the defender's output when already computed."""
        c, cfg = self.ctx, self.ctx.cfg
        started = time.perf_counter()
        if stored is None:
            stored = store_dataset(defender, c.images, batch_order(len(c.images), cfg.seed), cfg.batch_size, c.device,
                                   f"{protector}: defender stores")
        own = store_dataset(attacker, c.attacker.images, batch_order(len(c.attacker.images), cfg.seed + 1),
                            cfg.batch_size, c.device, f"{protector}: attacker's copy")
        k = min(cfg.inversion_faces, len(stored))
        settings = InversionSettings(cfg.inversion_steps, cfg.inversion_lr, cfg.inversion_tv, batch_size=32)
        if floor:
            decoder = self._fit(EmbeddingDecoder(stored.shape[1]), own, f"{protector} decoder")
            a0_recon = decode_all(decoder, stored, c.device)
            self.score(protector, "A0", "decoder on e", a0_recon)
            self.score(protector, "A1", "decoder on e", a0_recon)
            white = embedding_objective(c.recognizer)
            surrogate = embedding_objective(nn.Sequential(c.surrogate, c.recognizer.head))
        else:
            a0_recon = decode_all(c.a0.model, stored, c.device)
            self.score(protector, "A0", f"{c.a0.label} trained on clean", a0_recon)
            fresh = self._fit(None, own, f"{protector} A1 decoder")
            self.score(protector, "A1", "decoder trained on protected", decode_all(fresh, stored, c.device))
            tuned = self._fit(copy.deepcopy(c.a0.model), own, f"{protector} A1 fine-tune", epochs=max(1, cfg.tier_epochs // 2))
            self.score(protector, "A1", "A0 fine-tuned on protected", decode_all(tuned, stored, c.device))
            white = feature_objective(c.bundle.extractor)
            surrogate = feature_objective(c.surrogate)
        targets = stored[:k]
        self.score(protector, "A2", "invert E (white-box)",
                   invert(white, targets, settings, c.device, desc=f"{protector} A2 white-box"), slice(0, k))
        self.score(protector, "A2", "invert surrogate E (black-box)",
                   invert(surrogate, targets, settings, c.device, desc=f"{protector} A2 surrogate"), slice(0, k))
        self.score(protector, "A2", "invert E from A0 output",
                   invert(white, targets, settings, c.device, init=a0_recon[:k], desc=f"{protector} A2 from A0"),
                   slice(0, k))
        self._link(protector, own, stored, floor)
        log.info("%s A3 linkage rank-1 %.3f (chance %.4f); tiers took %.0f s", protector, self.linkage[protector],
                 c.gallery.chance, time.perf_counter() - started)

    def guess(self, image: torch.Tensor) -> None:
        """Nothing stored: ``image`` (the attacker's mean public face) for every face, in every tier.

        Aligned faces share their layout, so this scores well on pixel similarity (SSIM about 0.5
        on LFW) while it carries no identity: the baseline every attack must beat to have learned
        anything from the stored value, and a floor that no storage can go below.
        """
        attack = "mean public face"
        self.score(PRIOR, TIERS[0], attack, image.expand(len(self.ctx.images), -1, -1, -1))
        row, example = self.rows[-1], self.examples[PRIOR][f"{TIERS[0]} {attack}"]
        for tier in TIERS[1:]:  # the same guess in every tier: scored once
            self.rows.append({**row, "tier": tier})
            self.examples[PRIOR][f"{tier} {attack}"] = example
        self.linkage[PRIOR] = self.ctx.gallery.chance

    def _link(self, protector: str, own: torch.Tensor, stored: torch.Tensor, floor: bool) -> None:
        """A3 (b): the better of an MLP student and a closed-form linear map, from R(stored) to the judge."""
        c, cfg = self.ctx, self.ctx.cfg
        if not floor:  # feature maps: the attacker reads them through its copy of R
            own, stored = predict(c.recognizer.head, own, c.device), predict(c.recognizer.head, stored, c.device)
        student = train_linkage_student(own, c.attacker_judge, cfg.linkage_epochs, c.device, seed=cfg.seed,
                                        desc=f"{protector} linkage")
        links = {"mlp": student, "linear": fit_linear_link(own, c.attacker_judge).to(c.device)}
        scores = {name: rank1(predict(link, stored, c.device), c.names, c.gallery, metric="cosine")
                  for name, link in links.items()}
        self.linkage_by_map[protector] = scores
        self.linkage[protector] = max(scores.values())

    def _fit(self, model: nn.Module | None, stored: torch.Tensor, desc: str, epochs: int | None = None) -> nn.Module:
        """L1 decoder training on the attacker's (image, stored value) pairs; every 20th pair validates."""
        c, cfg = self.ctx, self.ctx.cfg
        images = c.attacker.images
        val = torch.arange(len(images)) % 20 == 0
        train_idx, val_idx = (~val).nonzero().flatten(), val.nonzero().flatten()
        recipe = attacker_recipe(cfg, c.bundle, cfg.attackers[0], "adaptive-attacker")
        training = ReconstructionTraining(recipe.spec, epochs or cfg.tier_epochs, cfg.train_batch_size,
                                          cfg.tier_lr, recipe.seed)

        def pairs_of(index: torch.Tensor):  # noqa: ANN202
            def pairs(idx: torch.Tensor, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
                rows = index[idx]
                return images[rows].float().div(255).to(c.device), stored[rows].float().to(c.device)
            return pairs

        model, _ = fit_reconstructor(training, len(train_idx), pairs_of(train_idx),
                                     lambda m: validate_pairs(m, len(val_idx), pairs_of(val_idx)), c.device, desc,
                                     model=model)
        return model


def _storers(name: str, cfg: EvaluationConfig, bundle: Bundle, own_shadow: TrainedNet | None,
             base: ProtectorParams, device: torch.device) -> tuple[StoreFn, StoreFn]:
    """(defender's storage, attacker's copy of it) as functions of images."""
    e = bundle.extractor

    def with_protector(p: Protector) -> StoreFn:
        return lambda x: p(e(x)).features

    defender = make_protector(name, bundle, base, generator=torch.Generator().manual_seed(cfg.seed),
                              channels_last=cfg.channels_last)
    if name == "advface":
        assert own_shadow is not None
        attacker = make_protector(name, bundle, base, shadow=own_shadow.model.to(device),
                                  channels_last=cfg.channels_last)
    else:
        attacker = make_protector(name, bundle, base, generator=torch.Generator().manual_seed(cfg.seed + 7))
    return with_protector(defender), with_protector(attacker)


def add_summary(results: dict[str, Any]) -> None:
    """results['summary'] (the best attack per tier) and, with resynth, its margins over the floors."""
    summary = summarize_tiers(results["rows"], results["linkage_rank1"])
    results["summary"] = summary
    if "resynth" in summary and FLOOR in summary:
        results["resynth_margins"] = {floor: margins(summary, "resynth", floor) for floor in summary
                                      if floor.startswith(FLOOR)}


def run_tiers(cfg: EvaluationConfig, bundle: Bundle, recognizer: Recognizer, faces: EvalFaces, attack: AttackData,
              a0: TrainedNet, protectors: list[str], threshold: float, judge: DlibFaceRecognizer, cache: ModelCache,
              judge_cache: EmbeddingCache, device: torch.device,
              stored: dict[str, torch.Tensor] | None = None) -> tuple[Tiers, dict[str, Any]]:
    """(results['tiers'], example reconstructions per protector and attack) for every protector and the floor.

    ``stored`` holds the main table's stored features of the privacy faces (``select_privacy_faces``,
    in its order), which the tiers then attack instead of protecting the faces a second time.
    """
    started = time.perf_counter()
    freeze(recognizer)  # attacks differentiate through R, never into it (and keep no graph of its weights)
    stored = stored or {}
    chosen = select_privacy_faces(len(faces), cfg.tier_faces, cfg.seed)
    images = faces.images[chosen]
    names = [faces.names[i] for i in chosen.tolist()]
    paths = [faces.paths[i] for i in chosen.tolist()]
    originals_judge = judge_cache.embed(images, judge.embed, desc="judge: privacy faces")
    gallery = build_gallery(cfg.data, names, paths, lambda x: judge_cache.embed(x, judge.embed, desc="judge: gallery"),
                            cfg.gallery_distractors, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(attack.attacker), generator=generator)[: cfg.tier_attack_faces]
    attacker = attack.attacker.take(pick.sort().values)
    attacker_judge = judge_cache.embed(attacker.images, judge.embed, desc="judge: attacker faces")
    surrogate = fit_surrogate_extractor(attacker.images, bundle.extractor, bundle.manifest.split, cfg.surrogate_epochs,
                                        device, seed=cfg.seed)
    with torch.no_grad():
        originals_embedding = torch.cat([recognizer(images[i : i + 64].float().div(255).to(device)).float().cpu()
                                         for i in range(0, len(images), 64)])
    ctx = TierContext(cfg, bundle, recognizer, judge, judge_cache, images, names, originals_judge,
                      originals_embedding, gallery, attacker, attacker_judge, a0, surrogate, threshold, device)
    runner = TierRunner(ctx)
    base = cfg.protector_params()
    own_shadow = None
    if "advface" in protectors:
        arch = bundle.manifest.shadow.arch
        own_shadow = train_on_features(arch, "adaptive-shadow", shadow_recipe(cfg, bundle, arch, "adaptive-shadow"),
                                       attack.attacker, fingerprint(attack.attacker), bundle, cache, device)
    for name in protectors:
        defender, attacker_copy = _storers(name, cfg, bundle, own_shadow, base, device)
        runner.run(name, defender, attacker_copy, floor=False,
                   stored=stored.get(name))

    def embed(x: torch.Tensor) -> torch.Tensor:
        return recognizer(x)

    runner.run(FLOOR, embed, embed, floor=True)
    runner.guess(attacker.images.float().div(255).mean(dim=0, keepdim=True))
    results = {
        "privacy_faces": len(images), "privacy_identities": len(set(names)), "gallery_identities": len(gallery.identities),
        "gallery_distractors": len(set(gallery.identities) - set(names)),
        "chance_rank1": gallery.chance, "attacker_faces": len(attacker), "attacker_identities": len(attacker.identities),
        "inversion_faces": min(cfg.inversion_faces, len(images)),
        "inversion": {"steps": cfg.inversion_steps, "lr": cfg.inversion_lr, "tv_weight": cfg.inversion_tv},
        "surrogate_epochs": cfg.surrogate_epochs, "epochs": cfg.tier_epochs,
        "linkage_epochs": cfg.linkage_epochs, "judge": judge.name,
        "judge_threshold": 0.6, "srra_threshold": threshold,
        "rows": runner.rows, "linkage_rank1": runner.linkage,
        "linkage_by_map": runner.linkage_by_map, "seconds": time.perf_counter() - started,
    }
    add_summary(results)
    examples = {"faces": images[: cfg.examples].float().div(255), "columns": runner.examples}
    return results, examples
