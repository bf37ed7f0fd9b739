"""Replay attack success rate (SRRA): can a reconstructed face pass as its owner?

The attacker feeds the reconstruction to the face recogniser as a probe. The attack succeeds
when the cosine similarity between the recogniser's embedding of the reconstruction and its
embedding of the ORIGINAL face image (the image whose stored feature was inverted) reaches the
verification threshold, the one with the best clean verification accuracy on the pairs
(:attr:`VerificationResult.threshold`). This is the paper's protocol as we read it, and the
strictest reading for the defender: the reference is the very photo the feature came from.

Because a system in the field would compare against some other enrolled photo of the person,
:func:`replay_attack` also reports ``srra_other``: the same test against a different image of
the same identity (faces whose identity has only one image in the set are left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from plugin_service.verification import cosine_similarity


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
