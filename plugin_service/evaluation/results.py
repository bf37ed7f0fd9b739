"""The one format of an evaluation's results: what run_evaluation returns and results.json holds.

The report is rendered from this dict alone, and readers (the README's tables, scripts that
compare runs) key into it, so its shape is a contract. It is written down here once as
TypedDicts: the producer and the report are type-checked against it, and
``tests/test_evaluation_report.py`` checks that a real run's results.json has exactly these keys.
It stays a dict of JSON values (not dataclasses) so that results.json round-trips unchanged. (No
``from __future__ import annotations`` here: TypedDict must see ``NotRequired`` unquoted.)
"""

from typing import Any, NotRequired, TypedDict


class Meta(TypedDict):
    created: str  # ISO-8601, UTC
    device: str
    torch: str
    python: str
    seconds: float  # wall time of the whole run


class BundleInfo(TypedDict):
    path: str
    version: str
    content_hash: str
    shadow: dict[str, Any]  # ShadowSpec as a dict
    pgd: dict[str, Any]  # the bundle's PGD defaults
    shadow_data: str | None


class DataInfo(TypedDict):
    eval_root: str
    pairs_file: str
    pairs: int
    eval_faces: int
    eval_identities: int
    attack_root: str
    defender_faces: int
    defender_identities: int
    attacker_faces: int
    attacker_identities: int
    eval_attack_overlap: int


class Verification(TypedDict):
    accuracy: float  # 10-fold (LFW protocol) mean
    std: float  # across folds
    threshold: float
    fold_accuracies: list[float]
    tar_at_far: dict[str, float]  # "1e-02" -> TAR


class Privacy(TypedDict):
    psnr: float
    psnr_std: float
    ssim: float
    ssim_std: float
    mse: float
    mse_std: float
    srra: float  # replay success against the very photo
    srra_other: float  # ... against another photo of the person
    faces: int


class PassRecord(TypedDict):
    """One protector setting over every verification face."""

    protector: str
    params: dict[str, Any]
    shadow: str | None  # advface: "bundle" or the transfer shadow's label
    privacy: dict[str, Privacy]  # attacker label -> numbers
    utility: dict[str, Verification]  # recogniser head -> numbers
    perturbation_norm: float
    seconds: float
    key: str  # memo key of the pass: protector, resolved params, shadow
    shadow_loss_before: NotRequired[float]
    shadow_loss_after: NotRequired[float]


class SweepPoint(TypedDict):
    protector: str
    knob: str  # eps or dp_epsilon
    value: float
    accuracy: float
    accuracy_std: float
    worst_attacker: str
    psnr: float
    ssim: float
    srra: float
    per_attacker: dict[str, dict[str, float]]


class TierRow(TypedDict):
    protector: str
    tier: str  # A0, A1, A2
    attack: str
    faces: int
    judged_faces: int
    ssim: float
    psnr: float
    dlib_same: float
    dlib_rank1: float
    srra: float


class Tiers(TypedDict, total=False):
    """Empty when the tiers did not run (``--no-tiers``)."""

    privacy_faces: int
    privacy_identities: int
    gallery_identities: int
    gallery_distractors: int
    chance_rank1: float
    attacker_faces: int
    attacker_identities: int
    inversion_faces: int
    inversion: dict[str, float]
    surrogate_epochs: int
    epochs: int
    linkage_epochs: int
    judge: str
    judge_threshold: float
    srra_threshold: float
    rows: list[TierRow]
    linkage_rank1: dict[str, float]  # the better of the two maps below (chance for "nothing stored")
    linkage_by_map: dict[str, dict[str, float]]  # protector -> {"mlp": rank-1, "linear": rank-1}
    seconds: float
    summary: dict[str, dict[str, Any]]  # protector -> tier -> strongest numbers (scoring.summarize_tiers)
    resynth_margins: dict[str, dict[str, dict[str, float]]]  # floor -> tier -> resynth minus floor


class Results(TypedDict):
    meta: Meta
    config: dict[str, Any]  # EvaluationConfig.to_json()
    bundle: BundleInfo
    recognizers: dict[str, dict[str, Any]]  # head name -> path and RecognizerSpec
    data: DataInfo
    disjointness: dict[str, Any]
    networks: dict[str, Any]  # attackers, adaptive, transfer shadows: their training summaries
    threshold: float  # clean verification threshold, the replay attack's
    clean: dict[str, Verification]
    main_attacker: str
    adaptive_attacker: str | None
    main: dict[str, PassRecord]
    tradeoff: list[SweepPoint]
    transfer: dict[str, Any]
    tiers: Tiers
    figures: NotRequired[dict[str, str]]  # figure name -> PNG file, added when written
