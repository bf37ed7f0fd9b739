"""Utility: face verification accuracy when the enrolled side of each pair is a stored feature.

Under the LFW protocol (10 folds, threshold chosen on the other nine) the left image of each pair
plays the enrolled face, whose feature the server stored after protection and embeds with its
head (:meth:`Recognizer.embed_features`); the right image plays the probe, a fresh clean photo
embedded by the full recogniser. With the 'none' protector this is exactly clean verification.
"""

from __future__ import annotations

import numpy as np
import torch

from plugin_service.evaluation.data import PairIndex
from plugin_service.evaluation.verification import VerificationResult, cosine_similarity, kfold_accuracy


def pair_scores(left_emb: torch.Tensor, right_emb: torch.Tensor, pairs: PairIndex) -> np.ndarray:
    """Cosine similarity of each pair: ``left_emb`` rows for the left faces, ``right_emb`` for the right."""
    return cosine_similarity(left_emb[torch.from_numpy(pairs.left)], right_emb[torch.from_numpy(pairs.right)])


def verify(left_emb: torch.Tensor, right_emb: torch.Tensor, pairs: PairIndex) -> VerificationResult:
    """10-fold verification accuracy (and the all-pairs best threshold) of the pairs."""
    return kfold_accuracy(pair_scores(left_emb, right_emb, pairs), pairs.same, pairs.folds)


def verification_summary(result: VerificationResult) -> dict[str, float | list[float]]:
    return {"accuracy": result.accuracy, "std": result.std, "threshold": result.threshold,
            "fold_accuracies": list(result.fold_accuracies)}
