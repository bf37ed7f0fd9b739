"""Face verification under the LFW protocol (10 folds, threshold chosen on the other nine) and TAR at FAR.

Shared by recogniser training (which reports its accuracy) and evaluation; it knows embeddings
and pair indices, nothing of models.

When the enrolled side of each pair is a stored feature, the left image of each pair plays the
enrolled face, whose feature the server stored after protection and embeds with R; the right
image plays the probe, a fresh clean photo embedded by the full recogniser.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from plugin_service.pairs import PairIndex


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean over folds
    std: float
    threshold: float  # best threshold on all pairs, for replay attacks
    fold_accuracies: tuple[float, ...]
    tar_at_far: dict[str, float] = field(default_factory=dict)  # "1e-2" -> TAR at that FAR, over all pairs


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) embedding batches."""
    a = torch.nn.functional.normalize(a.float(), dim=1)
    b = torch.nn.functional.normalize(b.float(), dim=1)
    return (a * b).sum(dim=1).cpu().numpy()


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The similarity threshold (score >= t means 'same') with the highest accuracy, and that accuracy.

    Candidates are the midpoints between sorted scores plus both ends, so the optimum over all
    thresholds is found exactly.
    """
    s = np.sort(scores)
    candidates = np.concatenate([[s[0] - 1e-6], (s[1:] + s[:-1]) / 2, [s[-1] + 1e-6]])
    accs = ((scores[None, :] >= candidates[:, None]) == same[None, :]).mean(axis=1)
    i = int(np.argmax(accs))
    return float(candidates[i]), float(accs[i])


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> VerificationResult:
    """LFW protocol: for each fold, pick the threshold on the others and score this one."""
    scores, same, folds = np.asarray(scores, float), np.asarray(same, bool), np.asarray(folds)
    accs = []
    for f in np.unique(folds):
        test = folds == f
        t, _ = best_threshold(scores[~test], same[~test])
        accs.append(float(((scores[test] >= t) == same[test]).mean()))
    threshold, _ = best_threshold(scores, same)
    tar = {f"{far:.0e}": tar_at_far(scores, same, far) for far in FARS}
    return VerificationResult(float(np.mean(accs)), float(np.std(accs)), threshold, tuple(accs), tar)


FARS = (1e-2, 1e-3)


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """True accept rate at the lowest threshold whose false accept rate is at most ``far``.

    With M impostor pairs, FAR can only be resolved down to 1/M (LFW: 3,000 impostors, so
    1e-3 means at most 3 accepted impostors); below that the strictest threshold is used.
    """
    scores, same = np.asarray(scores, float), np.asarray(same, bool)
    impostors = np.sort(scores[~same])[::-1]
    if len(impostors) == 0 or same.sum() == 0:
        return float("nan")
    allowed = int(np.floor(far * len(impostors)))
    threshold = impostors[allowed] if allowed < len(impostors) else -np.inf  # accept strictly above it
    return float((scores[same] > threshold).mean())




def pair_scores(left_emb: torch.Tensor, right_emb: torch.Tensor, pairs: PairIndex) -> np.ndarray:
    """Cosine similarity of each pair: ``left_emb`` rows for the left faces, ``right_emb`` for the right."""
    return cosine_similarity(left_emb[torch.from_numpy(pairs.left)], right_emb[torch.from_numpy(pairs.right)])


def verify(left_emb: torch.Tensor, right_emb: torch.Tensor, pairs: PairIndex) -> VerificationResult:
    """10-fold verification accuracy (and the all-pairs best threshold) of the pairs."""
    return kfold_accuracy(pair_scores(left_emb, right_emb, pairs), pairs.same, pairs.folds)


def verification_summary(result: VerificationResult) -> dict[str, float | list[float] | dict[str, float]]:
    return {"accuracy": result.accuracy, "std": result.std, "threshold": result.threshold,
            "fold_accuracies": list(result.fold_accuracies), "tar_at_far": dict(result.tar_at_far)}
