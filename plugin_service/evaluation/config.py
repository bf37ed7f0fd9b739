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
from plugin_service.protect.registry import ProtectorParams
from plugin_service.runtime import default_cache_dir, judge_cache_dir


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

    data: Path
    pairs: Path
    attack_data: tuple[Path, ...]  # one or more LFW-layout folders, split by identity into halves
    out: Path
    bundle: Path | None = None  # None: the default bundle embedded in the package
    recognizer: Path | None = None  # None: the default recogniser embedded in the package
    finetuned_recognizer: Path | None = None  # a head fine-tuned by `advface finetune-head`

    # Empty: every protector the bundle supports (resynth only when it carries R).
    protectors: tuple[str, ...] = ()
    attackers: tuple[str, ...] = SHADOW_ARCHITECTURES
    adaptive_attacker: str | None = "urec"  # None (or "none" in create): no adaptive attacker
    transfer_shadows: tuple[str, ...] = SHADOW_ARCHITECTURES  # empty: no transferability matrix
    eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)  # trade-off sweep for advface and random
    dp_epsilons: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)  # trade-off sweep for dp

    protector_eps: float | None = None  # main tables; None: the bundle's PGD eps
    pgd_steps: int | None = None  # None: the bundle's PGD steps
    pgd_alpha: float | None = None  # None: the bundle's PGD step size
    dp_epsilon: float | None = None  # None: ProtectorParams' default
    dp_bound: float | None = None  # None: ProtectorParams' default

    attacker_width: int | None = None  # None: twice the bundle shadow's width
    attacker_depth: int = 2
    attacker_epochs: int = 10
    shadow_width: int | None = None  # transfer and adaptive shadows; None: the bundle shadow's
    shadow_depth: int | None = None
    shadow_epochs: int | None = None  # None: the bundle's recorded shadow_epochs, else 10
    train_batch_size: int = 32
    lr: float = 1e-4  # the paper's Adam learning rate for reconstruction networks

    batch_size: int = 32  # faces per protector call: AdvFace's shadow uses batch statistics
    channels_last: bool = False  # AdvFace on the engine's channels-last PGD: same function, ~1.5x faster on CPU
    resume: bool = True  # keep each finished pass in the cache and reuse it when a run is restarted
    pairs_per_fold: int | None = None  # keep this many matched and mismatched pairs per fold
    attack_limit_per_identity: int | None = None
    attack_max_identities: int | None = None
    examples: int = 4  # faces in the reconstruction figure

    tiers: bool = True  # the attacker tiers A0-A3 and the embedding-only floor (needs the dlib judge)
    tier_faces: int | None = 1024  # privacy faces the tiers score; None: every verification face
    tier_attack_faces: int = 1024  # attacker faces for A1 decoders, the linkage student, the surrogate E
    tier_epochs: int = 8  # A1 decoders, the floor's decoder and the linkage student
    tier_lr: float = 1e-3  # A1 decoders: faster than the paper's 1e-4, the attacker is in a hurry
    gallery_distractors: int = 1000  # identities beyond the probes' in the rank-1 gallery (one photo each)
    judge_faces: int | None = 300  # faces per reconstruction set the judge scores; None: all
    inversion_faces: int = 64  # A2 inversions are per-face optimisations: the first N privacy faces
    inversion_steps: int = 200
    inversion_lr: float = 0.3
    inversion_tv: float = 0.1
    surrogate_epochs: int = 3  # black-box A2: epochs fitting a surrogate E to (public face, E(face)) queries
    judge_cache_dir: Path | None = None  # None: default_cache_dir()'s sibling 'judge'

    cache_dir: Path | None = None  # None: default_cache_dir()
    use_cache: bool = True
    allow_unknown_shadow_data: bool = False
    quick: bool = False
    device: str = "auto"
    seed: int = 0

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
        if self.attacker_epochs < 1 or (self.shadow_epochs is not None and self.shadow_epochs < 1):
            raise EvaluationError("epochs must be >= 1")

    def protector_params(self) -> ProtectorParams:
        """The main tables' protector settings; unset fields keep the bundle's / registry's defaults."""
        dp = {k: v for k, v in (("dp_epsilon", self.dp_epsilon), ("dp_bound", self.dp_bound)) if v is not None}
        return ProtectorParams(steps=self.pgd_steps, alpha=self.pgd_alpha, eps=self.protector_eps, **dp)

    def resolved_judge_cache_dir(self) -> Path:
        return self.judge_cache_dir or judge_cache_dir()

    def resolved_cache_dir(self) -> Path | None:
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
