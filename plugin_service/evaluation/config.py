"""Everything one `advface evaluate` run does, as one typed object, and the error bad input raises.

The CLI only collects what the user set; :meth:`EvaluationConfig.create` lays those values over
either the full-scale defaults (the paper's settings) or the tiny ``--quick`` ones, so a quick
run still honours every option given explicitly and the report can print the exact settings.

:class:`EvaluationError` is the one exception raised for problems a user can fix; the CLI turns
it into a one-line message and exit code 2 instead of a traceback, so a refused run (an attacker
that shares identities with the shadow, a recogniser whose E is not the bundle's) reads as a
configuration problem rather than a crash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from plugin_service.names import PROTECTORS, SHADOW_ARCHITECTURES
from plugin_service.protector_params import ProtectorParams
from plugin_service.settings_cli import option

# The sections of `advface evaluate --help`, in their order there.
SECTIONS = INPUTS, COMPARE, PROTECTION, NETWORKS, TIERS, RUN = (
    "inputs", "what to compare", "protection settings (main tables)", "attackers and shadows",
    "attacker tiers (A0-A3 and the embedding-only floor; need the dlib judge)", "run")


class EvaluationError(ValueError):
    """The inputs of an evaluation are inconsistent; the message says which and how to fix it."""


# Overrides that make every stage tiny: a smoke run of the whole pipeline in a few minutes on
# two CPU cores. Attack widths differ from each other so that attacker != shadow even here.
QUICK_DEFAULTS: dict[str, Any] = {
    "attacker_width": 6,
    "attacker_depth": 1,
    "attacker_epochs": 1,
    "shadow_width": 4,
    "shadow_depth": 1,
    "shadow_epochs": 1,
    "pgd_steps": 3,
    "eps": (0.0, 0.2),
    "dp_epsilons": (1.0, 10.0),
    "pairs_per_fold": 2,
    "attack_limit_per_identity": 4,
    "attack_max_identities": 40,
    "examples": 3,
    "tier_faces": 8,
    "judge_faces": 8,
    "gallery_distractors": 4,
    "tier_attack_faces": 24,
    "tier_epochs": 1,
    "linkage_epochs": 2,
    "inversion_faces": 2,
    "inversion_steps": 3,
    "surrogate_epochs": 1,
}


@dataclass(frozen=True)
class EvaluationConfig:
    """Inputs and knobs of one evaluation; None means 'derive it from the bundle'.

    Attributes are grouped as: inputs, what to compare, PGD/DP settings, attacker and shadow
    recipes, data limits, and run settings. See ``advface evaluate --help`` for each one.
    """

    data: Path = option(help="LFW-layout verification faces (name/name_NNNN.jpg)", group=INPUTS)
    pairs: Path = option(help="LFW-format pairs.txt over --data", group=INPUTS)
    attack_data: tuple[Path, ...] = option(
        help="LFW-layout public face folder(s): attackers train on the attacker half of their identities, defender "
        "shadows on the defender half (the split train-shadow --half uses)", group=INPUTS)
    out: Path = option(help="report directory to write", group=INPUTS)
    bundle: Path | None = option(None, "model bundle directory", default_help="the embedded default bundle",
                                 group=INPUTS)
    recognizer: Path | None = option(None, "recogniser .safetensors whose E is the bundle's",
                                     default_help="the embedded one", group=INPUTS)
    finetuned_recognizer: Path | None = option(
        None, "a head fine-tuned by `advface finetune-head`: its accuracy is reported next to the original's",
        group=INPUTS)

    protectors: tuple[str, ...] = option(
        (), "comma-separated protectors; 'none' is always included as the reference", choices=PROTECTORS,
        default_help="none,random,dp,advface, and resynth when the bundle carries R", group=COMPARE)
    attackers: tuple[str, ...] = option(SHADOW_ARCHITECTURES, "paper-setting attacker architectures",
                                        choices=SHADOW_ARCHITECTURES, group=COMPARE)
    adaptive_attacker: str | None = option("urec", "architecture of the attacker that knows the defence, or none",
                                           choices=(*SHADOW_ARCHITECTURES, "none"), group=COMPARE)
    transfer_shadows: tuple[str, ...] = option(
        SHADOW_ARCHITECTURES, "shadow architectures of the transferability matrix, or none",
        choices=SHADOW_ARCHITECTURES, empty="none", group=COMPARE)
    eps: tuple[float, ...] = option((0.0, 0.05, 0.1, 0.2, 0.3),
                                    "trade-off sweep of the PGD radius for advface and random", group=COMPARE)
    dp_epsilons: tuple[float, ...] = option((1.0, 2.0, 5.0, 10.0, 20.0, 50.0), "trade-off sweep of the DP budget",
                                            group=COMPARE)

    protector_eps: float | None = option(None, "PGD radius", default_help="the bundle's", group=PROTECTION)
    pgd_steps: int | None = option(None, "PGD steps for advface and random", default_help="the bundle's",
                                   group=PROTECTION)
    pgd_alpha: float | None = option(None, "PGD step size", default_help="the bundle's", group=PROTECTION)
    dp_epsilon: float | None = option(None, "DP budget of the dp protector", default_help="the registry's",
                                      group=PROTECTION)
    dp_bound: float | None = option(None, "DP clipping bound / sensitivity", default_help="the registry's",
                                    group=PROTECTION)

    attacker_width: int | None = option(None, "attacker width", default_help="twice the bundle shadow's; never "
                                        "equal to it", group=NETWORKS)
    attacker_depth: int = option(2, "attacker depth", group=NETWORKS)
    attacker_epochs: int = option(10, "attacker training epochs", group=NETWORKS)
    shadow_width: int | None = option(None, "transfer/adaptive shadow width", default_help="the bundle shadow's",
                                      group=NETWORKS)
    shadow_depth: int | None = option(None, "transfer/adaptive shadow depth", default_help="the bundle shadow's",
                                      group=NETWORKS)
    shadow_epochs: int | None = option(None, "transfer/adaptive shadow epochs", default_help="the bundle's, else 10",
                                       group=NETWORKS)
    train_batch_size: int = option(32, "training batch size", group=NETWORKS)
    lr: float = option(1e-4, "Adam learning rate of reconstruction networks; the default is the paper's", group=NETWORKS)

    batch_size: int = option(32, "faces per protector call; AdvFace's shadow uses batch statistics", group=RUN)
    channels_last: bool = option(False, "run AdvFace's PGD on channels-last tensors, as `advface serve "
                                 "--channels-last` does: the same function up to floating-point reordering, about "
                                 "1.5x faster on CPU", group=RUN)
    resume: bool = option(True, "recompute every protector pass instead of reusing the ones a previous, interrupted "
                          "run of the same settings finished (kept under --cache-dir)", group=RUN)
    keep_features: bool = option(False, "keep every verification face's stored features of the main table's passes "
                                 "under --cache-dir (float16, 0.76 MB a face: 5.8 GB per protector on LFW), so a later "
                                 "run that changes only the recognisers or attackers reads them instead of protecting "
                                 "again", group=RUN)
    pairs_per_fold: int | None = option(None, "use only this many matched and mismatched pairs per fold", group=RUN)
    attack_limit_per_identity: int | None = option(None, "read at most this many attack faces per identity", group=RUN)
    attack_max_identities: int | None = option(None, "read only the first N attack identities (sorted)", group=RUN)
    examples: int = option(4, "faces in the reconstruction figure", group=RUN)

    tiers: bool = option(True, "skip the tiers (and the judge)", group=TIERS)
    tier_faces: int | None = option(1024, "privacy faces the tiers score", group=TIERS)  # None: every verification face
    tier_attack_faces: int = option(1024, "attacker faces for A1 decoders, linkage and surrogate E", group=TIERS)
    tier_epochs: int = option(8, "epochs of A1 decoders and the floor decoder", group=TIERS)
    linkage_epochs: int = option(30, "epochs of the A3 linkage MLP (it trains on R's embeddings, computed once: "
                                 "seconds)", group=TIERS)
    tier_lr: float = 1e-3  # A1 decoders: faster than the paper's 1e-4, the attacker is in a hurry (no flag)
    gallery_distractors: int = option(1000, "identities beyond the probes' in the rank-1 gallery, one photo each",
                                      group=TIERS)
    judge_faces: int | None = option(300, "faces per reconstruction set the dlib judge scores", group=TIERS)  # None: all
    inversion_faces: int = option(64, "faces each A2 inversion runs on (the first privacy faces: A2 inversions are "
                                  "per-face optimisations)", group=TIERS)
    inversion_steps: int = option(200, "Adam steps per A2 inversion", group=TIERS)
    inversion_lr: float = 0.3  # this and inversion_tv are no flags
    inversion_tv: float = 0.1
    surrogate_epochs: int = option(3, "epochs fitting the black-box surrogate E to (public face, E(face)) queries",
                                   group=TIERS)
    judge_cache_dir: Path | None = option(None, "judge embedding cache", default_help="~/.cache/advface/judge",
                                          group=TIERS)

    cache_dir: Path | None = option(None, "trained-network cache",
                                    default_help="$ADVFACE_CACHE_DIR or ~/.cache/advface/attackers", group=NETWORKS)
    use_cache: bool = option(True, "train every network afresh and cache nothing", flag="no-cache", group=NETWORKS)
    allow_unknown_shadow_data: bool = option(False, "evaluate a bundle whose manifest does not record its shadow "
                                             "identities (disjointness unverified)", group=NETWORKS)
    quick: bool = option(False, "smoke run: tiny networks, 1 epoch, 3 PGD steps, 2+2 pairs per fold, few attack "
                         "faces (explicit options still win); numbers are not meaningful", group=RUN)
    device: str = option("auto", "auto, cpu or cuda[:N]", group=RUN)
    seed: int = option(0, "base seed", group=RUN)

    @classmethod
    def create(cls, quick: bool = False, **overrides: Any) -> EvaluationConfig:
        """Full defaults, or the quick ones, overlaid with every override that is not None.

        ``adaptive_attacker="none"`` turns the adaptive attacker off (None means 'default' here).
        """
        values: dict[str, Any] = dict(QUICK_DEFAULTS) if quick else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("adaptive_attacker") == "none":
            values["adaptive_attacker"] = None
        values["quick"] = quick
        if isinstance(values.get("attack_data"), (str, Path)):
            values["attack_data"] = (Path(values["attack_data"]),)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Rejects names and values that would only fail deep inside a long run."""
        for name in self.protectors:
            if name not in PROTECTORS:
                raise EvaluationError(f"unknown protector {name!r}; choose from {', '.join(PROTECTORS)}")
        for name in (*self.attackers, *self.transfer_shadows, *([self.adaptive_attacker] if self.adaptive_attacker else [])):
            if name not in SHADOW_ARCHITECTURES:
                raise EvaluationError(f"unknown reconstruction architecture {name!r}; "
                                      f"choose from {', '.join(SHADOW_ARCHITECTURES)}")
        if not self.attackers:
            raise EvaluationError("at least one attacker architecture is needed")
        if any(e < 0 for e in self.eps) or any(e <= 0 for e in self.dp_epsilons):
            raise EvaluationError("--eps values must be >= 0 and --dp-epsilons values > 0")
        if self.batch_size < 2 or self.train_batch_size < 2:
            raise EvaluationError("batch sizes must be >= 2 (networks normalise with batch statistics)")
        if self.keep_features and not self.use_cache:
            raise EvaluationError("--keep-features keeps the features under the cache directory; drop --no-cache")
        if self.attacker_epochs < 1 or (self.shadow_epochs is not None and self.shadow_epochs < 1):
            raise EvaluationError("epochs must be >= 1")

    def protector_params(self) -> ProtectorParams:
        """The main tables' protector settings; unset fields keep the bundle's / registry's defaults."""
        dp = {k: v for k, v in (("dp_epsilon", self.dp_epsilon), ("dp_bound", self.dp_bound)) if v is not None}
        return ProtectorParams(steps=self.pgd_steps, alpha=self.pgd_alpha, eps=self.protector_eps, **dp)

    def resolved_judge_cache_dir(self) -> Path:
        from plugin_service.runtime import judge_cache_dir  # torch: not loaded to build `advface evaluate`'s flags

        return self.judge_cache_dir or judge_cache_dir()

    def resolved_cache_dir(self) -> Path | None:
        from plugin_service.runtime import default_cache_dir

        if not self.use_cache:
            return None
        return self.cache_dir or default_cache_dir()

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        for f in fields(self):
            if isinstance(body[f.name], Path):
                body[f.name] = str(body[f.name])
            elif isinstance(body[f.name], tuple):
                body[f.name] = [str(v) if isinstance(v, Path) else v for v in body[f.name]]
        return body
