"""`advface evaluate`: privacy and utility of every protector against attackers the defender never saw.

Order of work (each step logs what it does; long ones show progress bars):

1. Load the bundle and recogniser(s), check they share E, load the verification faces and the
   attack data, and refuse to go on if the attackers' identities overlap the bundle shadow's.
2. Train (or load from the cache) one attacker per architecture on the attacker half, the
   adaptive attacker, and the defender's transfer shadows on the defender half.
3. Embed the clean faces; the clean verification threshold is the replay attack's threshold.
4. One streamed pass per distinct protector setting: the main table, the eps trade-off sweep
   and the transferability matrix share passes whenever their protector settings coincide.
5. Write results.json, the figures and report.md under ``cfg.out``.

The numbers are returned as the same dict that results.json holds.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Collection
from dataclasses import asdict
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from plugin_service import hostmem
from plugin_service.bundle import Bundle, default_recognizer_path, load_bundle
from plugin_service.evaluation.attackers import (
    TrainedNet,
    train_adaptive_attacker,
    train_attackers,
    train_transfer_shadows,
)
from plugin_service.evaluation.caches import CachedPass, ModelCache, PassCache, model_digest, tensor_digest
from plugin_service.evaluation.config import EvaluationConfig
from plugin_service.evaluation.data import (
    batch_order,
    check_disjoint,
    load_attack_data,
    pick_examples,
    require_same_extractor,
    select_privacy_faces,
)
from plugin_service.evaluation.feature_store import FeatureStore
from plugin_service.evaluation.passes import PassOutputs, Source, live, make_protector, run_pass, with_eps
from plugin_service.evaluation.results import PassRecord, Results, SweepPoint, Tiers
from plugin_service.evaluation.scoring import replay_attack, summarize
from plugin_service.judge import EmbeddingCache, load_judge
from plugin_service.models.recognizer import Recognizer, embed_images, load_recognizer
from plugin_service.pairs import EvalFaces, load_eval_faces
from plugin_service.protect.base import Protector
from plugin_service.protect.registry import ProtectorParams
from plugin_service.runtime import pick_device, seed_everything
from plugin_service.verification import verification_summary, verify

log = logging.getLogger(__name__)
PRIMARY = "recognizer"
FINETUNED = "finetuned"
STORED_SIDE = "finetuned stored side"
SWEEP_KNOB = {"advface": "eps", "random": "eps", "dp": "dp_epsilon"}


def utility_views(heads: Collection[str]) -> dict[str, tuple[str, str]]:
    """Each utility column: (head that embeds the stored side, head that embeds the clean probe).

    A head distilled with ``--target clean`` learns R'(protected) = R(clean), so the backend may
    keep it for its stored features only and embed fresh probes with the original R: the
    ``STORED_SIDE`` column, next to the head used on both sides.
    """
    views = {head: (head, head) for head in heads}
    if FINETUNED in heads:
        views[STORED_SIDE] = (FINETUNED, PRIMARY)
    return views


class PassRunner:
    """Runs each distinct protector setting once over the verification faces and summarises it.

    Passes are memoised on (protector, its resolved parameters, shadow), so the sweep point at
    the main table's eps and the transfer row of the bundle's own shadow cost nothing extra, and
    each pass with the bundle's shadow is also kept in ``pass_cache`` so a restarted run resumes.
    With ``features`` (``--keep-features``) the main table's passes also keep every face's stored
    features there, which later runs with other recognisers or attackers replay (feature_store.py).
    Reconstructions of the example faces are kept (outside results.json) for the figure, and the
    stored features of the ``keep`` faces (the tiers' privacy faces) for the tiers.
    """

    def __init__(self, cfg: EvaluationConfig, bundle: Bundle, faces: EvalFaces, attackers: dict[str, nn.Module],
                 heads: dict[str, Recognizer], clean: dict[str, torch.Tensor], threshold: float,
                 device: torch.device, keep: torch.Tensor | None, pass_cache: PassCache,
                 features: FeatureStore | None = None) -> None:
        self.cfg, self.bundle, self.faces, self.attackers, self.heads = cfg, bundle, faces, attackers, heads
        self.clean, self.threshold, self.device, self.keep, self.pass_cache = clean, threshold, device, keep, pass_cache
        self.features = features
        self.order = batch_order(len(faces), cfg.seed)
        self.examples = pick_examples(faces.names, cfg.examples)
        self.stored: dict[str, torch.Tensor] = {}  # protector -> stored features of the keep faces, in keep's order
        self.records: dict[str, PassRecord] = {}
        self.example_images: dict[str, dict[str, torch.Tensor]] = {}
    @cached_property
    def _inputs(self) -> dict[str, Any]:
        """Everything a pass depends on besides the protector: the disk key's fields (hashed only when resuming)."""
        return {
            "bundle": self.bundle.content_hash, "faces": tensor_digest(self.faces.images),
            "names": tensor_digest(self.faces.names), "paths": tensor_digest(str(p) for p in self.faces.paths),
            "pairs": tensor_digest(np.stack([self.faces.pairs.left, self.faces.pairs.right, self.faces.pairs.same,
                                             self.faces.pairs.folds]).tolist()),
            "order": tensor_digest(self.order), "examples": tensor_digest(self.examples),
            "keep": tensor_digest(self.keep) if self.keep is not None else None, "batch_size": self.cfg.batch_size,
            "attackers": {k: model_digest(m) for k, m in self.attackers.items()},
            "heads": {k: model_digest(m) for k, m in self.heads.items()}, "threshold": self.threshold,
            "utility_views": utility_views(self.heads),
            "channels_last": self.cfg.channels_last, "device": str(self.device), "seed": self.cfg.seed,
            **({"keep_features": True} if self.features is not None else {}),  # scored on float16-rounded features
        }

    def _source(self, label: str, key: str, protector: Protector, main: bool) -> tuple[Source, Callable[[], None] | None]:
        """What a pass stores: the protector live, or a replay of the features an earlier run kept, or a recording."""
        protect = live(self.bundle.extractor, protector)
        if self.features is None or not main:
            return protect, None
        made_by = {k: self._inputs[k] for k in ("bundle", "faces", "order", "batch_size", "channels_last", "device",
                                                 "seed")}
        feature_key = self.features.key({**made_by, "pass": key})
        stored = self.features.load(feature_key, len(self.faces))
        if stored is not None:
            log.info("pass: %s reads the features an earlier run stored (the protector does not run)", label)
            return stored.replay(), None
        return self.features.recording(feature_key, len(self.faces), protect)

    def run(self, name: str, params: ProtectorParams, shadow: nn.Module | None = None,
            shadow_label: str = "bundle") -> PassRecord:
        protector = make_protector(name, self.bundle, params, shadow=shadow,
                                   generator=torch.Generator().manual_seed(self.cfg.seed),
                                   channels_last=self.cfg.channels_last)
        key = json.dumps([name, protector.params(), shadow_label if name == "advface" else None], sort_keys=True)
        if key in self.records:
            return self.records[key]
        label = f"{name} {json.dumps(protector.params(), sort_keys=True)}"
        label += f" shadow={shadow_label}" if name == "advface" else ""
        main = shadow is None and params == self.cfg.protector_params()
        wants_features = self.keep is not None and main
        disk_key = self.pass_cache.key({**self._inputs, "pass": key, "features": wants_features}) \
            if shadow is None and self.pass_cache.enabled else None
        done = self.pass_cache.load(disk_key) if disk_key is not None else None
        if done is not None:
            log.info("pass: %s, finished by an earlier run (resumed from the cache)", label)
        else:
            log.info("pass: %s", label)
            protect, finish = self._source(label, key, protector, main)
            out = run_pass(self.faces.images, self.order, protect, self.attackers, self.heads,
                           self.heads[PRIMARY], self.cfg.batch_size, self.device, self.examples, desc=name,
                           keep=self.keep if wants_features else None)
            if finish is not None:
                finish()
            log.info("pass %s took %.1f s", label, out.seconds)
            summary = self._summarise(key, name, protector.params(), shadow_label if name == "advface" else None, out)
            done = CachedPass(dict(summary), {a: o.examples for a, o in out.attacks.items()}, out.features)
            if disk_key is not None:
                self.pass_cache.save(disk_key, done)
        if done.features is not None:
            self.stored[name] = done.features
        record = cast(PassRecord, {**done.record, "key": key})
        self.records[key] = record
        self.example_images[key] = done.examples
        return record

    def _summarise(self, key: str, name: str, params: dict[str, Any], shadow_label: str | None,
                   out: PassOutputs) -> PassRecord:
        privacy = {}
        for attacker, result in out.attacks.items():
            replay = replay_attack(result.embeddings, self.clean[PRIMARY], self.faces.names, self.threshold)
            privacy[attacker] = summarize(result, replay)
        utility = {view: verification_summary(verify(out.feature_embeddings[stored], self.clean[probe],
                                                     self.faces.pairs))
                   for view, (stored, probe) in utility_views(self.heads).items()}
        record: PassRecord = {
            "protector": name, "params": params, "shadow": shadow_label, "privacy": privacy, "utility": utility,
            "perturbation_norm": float(out.perturbation_norm.mean()), "seconds": out.seconds, "key": key,
        }
        if out.shadow_loss_before is not None and out.shadow_loss_after is not None:
            record["shadow_loss_before"] = float(out.shadow_loss_before.mean())
            record["shadow_loss_after"] = float(out.shadow_loss_after.mean())
        return record


def _load_heads(cfg: EvaluationConfig, bundle: Bundle, device: torch.device) -> tuple[dict[str, Recognizer], dict[str, Any]]:
    paths = {PRIMARY: cfg.recognizer or default_recognizer_path()}
    if cfg.finetuned_recognizer is not None:
        paths[FINETUNED] = cfg.finetuned_recognizer
    heads, info = {}, {}
    for name, path in paths.items():
        model = load_recognizer(path).to(device).eval()
        require_same_extractor(model, bundle, "fine-tuned recogniser" if name == FINETUNED else "recogniser")
        heads[name] = model
        info[name] = {"path": str(path), **asdict(model.spec)}
    return heads, info


def _sweep_point(record: PassRecord, knob: str, value: float, paper_attackers: list[str]) -> SweepPoint:
    """One trade-off point: accuracy and the strongest paper-setting attacker's privacy numbers."""
    worst = max(paper_attackers, key=lambda a: record["privacy"][a]["psnr"])
    return {
        "protector": record["protector"], "knob": knob, "value": value,
        "accuracy": record["utility"][PRIMARY]["accuracy"], "accuracy_std": record["utility"][PRIMARY]["std"],
        "worst_attacker": worst, "psnr": record["privacy"][worst]["psnr"], "ssim": record["privacy"][worst]["ssim"],
        "srra": max(record["privacy"][a]["srra"] for a in paper_attackers),
        "per_attacker": {a: {k: record["privacy"][a][k] for k in ("psnr", "ssim", "srra")} for a in record["privacy"]},
    }


def run_evaluation(cfg: EvaluationConfig) -> Results:
    """Runs the whole evaluation and writes the report; returns the results.json dict."""
    from plugin_service.evaluation.report import write_outputs

    started = time.perf_counter()
    hostmem.set_reuse(True)  # exact: freed activations stay mapped between PGD steps (engine_settings.py)
    seed_everything(cfg.seed)
    judge = load_judge() if cfg.tiers else None  # fails fast, naming what to install
    device = pick_device(cfg.device)
    bundle = load_bundle(cfg.bundle).to(device)
    heads, recognizer_info = _load_heads(cfg, bundle, device)
    attack = load_attack_data(cfg.attack_data, cfg.attack_limit_per_identity, cfg.attack_max_identities)
    disjoint = check_disjoint(bundle.manifest, attack.attacker.identities, cfg.allow_unknown_shadow_data)
    faces = load_eval_faces(cfg.data, cfg.pairs, cfg.pairs_per_fold)
    eval_overlap = sorted(set(faces.identities) & (set(attack.attacker.identities) | set(attack.defender.identities)))
    if eval_overlap:
        log.warning("%d verification identities also appear in --attack-data; privacy numbers may be optimistic "
                    "for the attacker", len(eval_overlap))
    asked = cfg.protectors or ("random", "dp", "advface", *(("resynth",) if bundle.recognizer is not None else ()))
    if "resynth" in asked:
        bundle.require_recognizer("the resynth protector")  # a clear error before hours of work
    protectors = list(dict.fromkeys(["none", *asked]))  # 'none' is every table's reference row
    with_advface = "advface" in protectors
    base = cfg.protector_params()

    cache = ModelCache(cfg.resolved_cache_dir())
    paper_attackers = train_attackers(cfg, bundle, attack, cache, device)
    networks: dict[str, Any] = {"attackers": {k: v.summary() for k, v in paper_attackers.items()}}
    all_attackers: dict[str, TrainedNet] = dict(paper_attackers)
    if cfg.adaptive_attacker and with_advface:
        own_shadow, adaptive = train_adaptive_attacker(cfg, bundle, attack, base, cache, device)
        all_attackers[adaptive.label] = adaptive
        networks["adaptive"] = {"shadow": own_shadow.summary(), "attacker": adaptive.summary()}
    transfer_shadows = train_transfer_shadows(cfg, bundle, attack, cache, device) if with_advface else {}
    networks["transfer_shadows"] = {a: (t.summary() if t else "bundle") for a, t in transfer_shadows.items()}

    clean = {name: embed_images(model, faces.images, device, desc=f"clean embeddings ({name})")
             for name, model in heads.items()}
    clean_verification = {view: verify(clean[stored], clean[probe], faces.pairs)
                          for view, (stored, probe) in utility_views(heads).items()}
    threshold = clean_verification[PRIMARY].threshold
    log.info("clean verification accuracy %.4f, replay threshold %.4f", clean_verification[PRIMARY].accuracy, threshold)

    keep = select_privacy_faces(len(faces), cfg.tier_faces, cfg.seed) if judge is not None else None
    pass_root = cfg.resolved_cache_dir()
    pass_cache = PassCache(pass_root / "passes" if pass_root is not None and cfg.resume else None)
    features = FeatureStore(pass_root / "features") if cfg.keep_features and pass_root is not None else None
    passes = PassRunner(cfg, bundle, faces, {k: v.model.to(device) for k, v in all_attackers.items()}, heads,
                        clean, threshold, device, keep, pass_cache, features)
    main = {name: passes.run(name, base) for name in protectors}
    tradeoff = []
    for name in (p for p in protectors if p in SWEEP_KNOB):
        values = cfg.dp_epsilons if name == "dp" else cfg.eps
        for value in values:
            record = passes.run(name, with_eps(base, name, value))
            tradeoff.append(_sweep_point(record, SWEEP_KNOB[name], value, list(paper_attackers)))
    transfer: dict[str, Any] = {}
    if transfer_shadows:
        rows = []
        for arch, trained in transfer_shadows.items():
            shadow = None if trained is None else trained.model.to(device)
            label = "bundle" if trained is None else f"defender-{arch}"
            rows.append(passes.run("advface", base, shadow=shadow, shadow_label=label))
        transfer = {
            "shadows": list(transfer_shadows), "shadow_labels": [r["shadow"] for r in rows],
            "attackers": list(paper_attackers),
            **{m: [[r["privacy"][a][m] for a in paper_attackers] for r in rows] for m in ("psnr", "ssim", "srra")},
            "accuracy": [r["utility"][PRIMARY]["accuracy"] for r in rows],
        }

    tiers: Tiers = {}
    tier_examples = None
    if judge is not None:
        from plugin_service.evaluation.tiers import run_tiers

        judge_cache = EmbeddingCache(cfg.resolved_judge_cache_dir(), judge.name)
        tiers, tier_examples = run_tiers(cfg, bundle, heads[PRIMARY], faces, attack, paper_attackers[cfg.attackers[0]],
                                         protectors, threshold, judge, ModelCache(cfg.resolved_cache_dir()),
                                         judge_cache, device, passes.stored)

    results: Results = {
        "meta": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
                 "torch": torch.__version__, "python": platform.python_version(),
                 "seconds": time.perf_counter() - started},
        "config": cfg.to_json(),
        "bundle": {"path": str(bundle.path), "version": bundle.version, "content_hash": bundle.content_hash,
                   "shadow": asdict(bundle.manifest.shadow), "pgd": asdict(bundle.manifest.pgd),
                   "shadow_data": bundle.manifest.provenance.get("shadow_data")},
        "recognizers": recognizer_info,
        "data": {"eval_root": str(cfg.data), "pairs_file": str(cfg.pairs), "pairs": len(faces.pairs),
                 "eval_faces": len(faces), "eval_identities": len(faces.identities),
                 "attack_root": ", ".join(map(str, cfg.attack_data)), "defender_faces": len(attack.defender),
                 "defender_identities": len(attack.defender.identities), "attacker_faces": len(attack.attacker),
                 "attacker_identities": len(attack.attacker.identities), "eval_attack_overlap": len(eval_overlap)},
        "disjointness": asdict(disjoint),
        "networks": networks,
        "threshold": threshold,
        "clean": {name: verification_summary(v) for name, v in clean_verification.items()},
        "main_attacker": cfg.attackers[0],
        "adaptive_attacker": networks["adaptive"]["attacker"]["label"] if "adaptive" in networks else None,
        "main": main,
        "tradeoff": tradeoff,
        "transfer": transfer,
        "tiers": tiers,
    }
    examples = {"faces": faces.images[passes.examples].float().div(255.0),
                "columns": [(name, passes.example_images[main[name]["key"]]) for name in protectors]}
    if tier_examples is not None:
        examples["tiers"] = tier_examples
    write_outputs(results, examples, cfg.out)
    return results
