"""The numbers: privacy of reconstructions, the replay attack, identity judged by dlib, the per-tier summary.

Privacy numbers of one attacker on one protector: reconstruction quality and replay success.

Higher PSNR/SSIM, lower MSE and higher SRRA mean the attacker recovered more of the face, i.e.
less privacy. Means and standard deviations are over faces.

Replay attack success rate (SRRA): can a reconstructed face pass as its owner?

The attacker feeds the reconstruction to the face recogniser as a probe. The attack succeeds
when the cosine similarity between the recogniser's embedding of the reconstruction and its
embedding of the ORIGINAL face image (the image whose stored feature was inverted) reaches the
verification threshold, the one with the best clean verification accuracy on the pairs
(:attr:`VerificationResult.threshold`). This is the paper's protocol as we read it, and the
strictest reading for the defender: the reference is the very photo the feature came from.

Because a system in the field would compare against some other enrolled photo of the person,
:func:`replay_attack` also reports ``srra_other``: the same test against a different image of
the same identity (faces whose identity has only one image in the set are left out).

Identity scores of reconstructions, by the independent judge: does the attacker get the person back?

* same-image match: the judge says the reconstruction and the original photo show the same person
  (dlib's own rule, Euclidean distance < 0.6).
* rank-1: the reconstruction's nearest neighbour in a gallery of one OTHER photo of every
  evaluation identity is the right person; chance is 1 / gallery size.

The strongest attack of each tier, per protector, and the floor composed with resynth.

Read per tier, a protector is as weak as the best attack on it, so the summary keeps, for each
metric separately, the maximum over that tier's attacks. *Nothing stored* is the attacker's mean
public face guessed for everyone: aligned faces share their layout, so it reaches an SSIM (about
0.5 on LFW) that several attacks on stored values do not, with no identity in it. Whoever holds
e can ignore it, so the floor cannot be below that guess: *embedding-only or nothing* is the
better of the two, per metric. The *composed* floor adds one fact the direct attacks on e miss:
anyone holding e also holds R and resynth's public start (they ship with the backend), so it can
compute synthesize(e) itself, which equals resynth's stored feature byte for byte
(tests/test_resynth.py), and run every attack on it. The best attack on e is therefore at
least as strong as the best attack on resynth's storage; where the direct floor attacks score lower
than those on resynth, the direct attacks on e were the weaker ones, not resynth the leakier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plugin_service.evaluation.passes import AttackOutputs
from plugin_service.evaluation.results import Privacy
from plugin_service.judge.dlib_resnet import DLIB_THRESHOLD
from plugin_service.verification import cosine_similarity


def summarize(attack: AttackOutputs, replay: ReplayResult) -> Privacy:
    """One attacker's privacy numbers on one pass, in the results format (means and stds over faces)."""
    return {"psnr": float(np.mean(attack.psnr)), "psnr_std": float(np.std(attack.psnr)),
            "ssim": float(np.mean(attack.ssim)), "ssim_std": float(np.std(attack.ssim)),
            "mse": float(np.mean(attack.mse)), "mse_std": float(np.std(attack.mse)),
            "srra": replay.srra, "srra_other": replay.srra_other, "faces": len(attack.psnr)}


@dataclass(frozen=True)
class ReplayResult:
    srra: float  # against the original image's embedding
    srra_other: float  # against another image of the same identity (nan when there is none)
    n: int
    n_other: int


def replay_success_rate(recon_emb: torch.Tensor, reference_emb: torch.Tensor, threshold: float) -> float:
    """Fraction of rows whose cosine similarity reaches ``threshold`` (the verifier's 'same' rule: >=)."""
    if len(recon_emb) == 0:
        return float("nan")
    return float((cosine_similarity(recon_emb, reference_emb) >= threshold).mean())


def other_image_index(names: Sequence[str]) -> np.ndarray:
    """For each face, another face of the same identity (the next one, cyclically); -1 if it has none."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    other = np.full(len(names), -1)
    for members in groups.values():
        if len(members) > 1:
            for k, i in enumerate(members):
                other[i] = members[(k + 1) % len(members)]
    return other


def replay_attack(recon_emb: torch.Tensor, clean_emb: torch.Tensor, names: Sequence[str], threshold: float) -> ReplayResult:
    """SRRA against the original image and against another image of the same person."""
    other = other_image_index(names)
    has = torch.from_numpy(np.nonzero(other >= 0)[0])
    srra = replay_success_rate(recon_emb, clean_emb, threshold)
    srra_other = replay_success_rate(recon_emb[has], clean_emb[torch.from_numpy(other[has.numpy()])], threshold)
    return ReplayResult(srra, srra_other, len(recon_emb), len(has))


@dataclass(frozen=True)
class Gallery:
    """One other photo's judge embedding per identity, and which probes have one."""

    embeddings: torch.Tensor  # (G, D)
    identities: list[str]  # (G,)

    @property
    def chance(self) -> float:
        return 1.0 / max(len(self.identities), 1)


def same_image_rate(reconstructed: torch.Tensor, original: torch.Tensor, threshold: float = DLIB_THRESHOLD) -> float:
    """Fraction of faces whose reconstruction the judge matches to its own original photo."""
    if len(original) == 0:
        return float("nan")
    return float(((reconstructed.float() - original.float()).norm(dim=1) < threshold).float().mean())


def rank1(queries: torch.Tensor, names: list[str], gallery: Gallery, metric: str = "euclidean") -> float:
    """Fraction of queries (those whose identity the gallery holds) whose nearest gallery entry is theirs."""
    index = {n: i for i, n in enumerate(gallery.identities)}
    rows = [i for i, n in enumerate(names) if n in index]
    if not rows:
        return float("nan")
    q = queries[rows].float()
    g = gallery.embeddings.float()
    if metric == "cosine":
        score = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    else:
        score = -torch.cdist(q, g)
    best = score.argmax(dim=1)
    truth = torch.tensor([index[names[i]] for i in rows])
    return float((best == truth).float().mean())


FLOOR = "embedding-only"
PRIOR = "nothing stored"
FLOOR_OR_PRIOR = "embedding-only or nothing"
COMPOSED = "embedding-only, composed"
METRICS = ("ssim", "dlib_same", "dlib_rank1")
TIERS = ("A0", "A1", "A2")


def _best(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and v == v]  # drop None and NaN
    return max(kept) if kept else None


def _dominating(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per tier and metric, the better of two summary rows (an attacker holding both picks the better)."""
    out: dict[str, Any] = {tier: {m: _best([a[tier][m], b[tier][m]]) for m in METRICS} for tier in TIERS}
    out["A3"] = _best([a["A3"], b["A3"]])
    return out


def summarize_tiers(rows: list[dict[str, Any]], linkage: dict[str, float]) -> dict[str, dict[str, Any]]:
    """{protector: {tier: {metric: best over the tier's attacks}, "A3": linkage rank-1}}, plus the derived floors."""
    summary: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["protector"] for r in rows):
        summary[name] = {tier: {m: _best([r[m] for r in rows if r["protector"] == name and r["tier"] == tier])
                                for m in METRICS} for tier in TIERS}
        summary[name]["A3"] = linkage.get(name)
    if FLOOR in summary and PRIOR in summary:
        summary[FLOOR_OR_PRIOR] = _dominating(summary[FLOOR], summary[PRIOR])
    if FLOOR in summary and "resynth" in summary:
        summary[COMPOSED] = _dominating(summary.get(FLOOR_OR_PRIOR, summary[FLOOR]), summary["resynth"])
    return summary


def margins(summary: dict[str, dict[str, Any]], protector: str, floor: str) -> dict[str, dict[str, float | None]]:
    """Per tier, how far ``protector``'s best attack is above ``floor``'s: SSIM and rank-1 (points of rate)."""
    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    out = {tier: {"ssim": diff(summary[protector][tier]["ssim"], summary[floor][tier]["ssim"]),
                  "dlib_rank1": diff(summary[protector][tier]["dlib_rank1"], summary[floor][tier]["dlib_rank1"])}
           for tier in TIERS}
    out["A3"] = {"linkage_rank1": diff(summary[protector]["A3"], summary[floor]["A3"])}
    return out
