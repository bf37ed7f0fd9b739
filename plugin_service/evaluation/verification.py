"""Face verification accuracy under the LFW protocol: 10 folds, threshold chosen on the other nine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean over folds
    std: float
    threshold: float  # best threshold on all pairs, for replay attacks
    fold_accuracies: tuple[float, ...]


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
    return VerificationResult(float(np.mean(accs)), float(np.std(accs)), threshold, tuple(accs))

