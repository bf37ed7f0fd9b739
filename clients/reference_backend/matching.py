"""Scores and decisions: cosine of unit embeddings, best enrolled face per person, one threshold.

A person with several enrolled faces scores the best of them (the usual multi-template rule).
This module needs only NumPy, so the CLI can show the threshold's default without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference_backend.store import Gallery

# No recogniser file records a decision threshold, so the default is measured: the best all-pairs
# threshold for AdvFace-protected enrolled features against clean probes with the embedded models,
# 0.4997 on 240 LFW pairs (reports/lfw/results.json: main.advface.utility.recognizer.threshold).
# Clean against clean it is 0.621 there; resynth-protected against clean, 0.628.
DEFAULT_THRESHOLD = 0.50


@dataclass(frozen=True)
class Verification:
    person_id: str
    score: float  # best cosine over the person's enrolled faces
    threshold: float

    @property
    def match(self) -> bool:
        return self.score >= self.threshold


@dataclass(frozen=True)
class Candidate:
    person_id: str
    score: float


@dataclass(frozen=True)
class Identification:
    candidates: list[Candidate]  # best first, one per person
    threshold: float

    @property
    def match(self) -> str | None:
        """The best candidate if it clears the threshold, else None (an unknown face)."""
        best = self.candidates[0] if self.candidates else None
        return best.person_id if best is not None and best.score >= self.threshold else None


def best_score(gallery: Gallery, probe: np.ndarray) -> float:
    """The best cosine between a unit probe embedding and the gallery's unit embeddings."""
    return float(np.max(gallery.embeddings @ probe))


def rank_persons(gallery: Gallery, probe: np.ndarray, top_k: int) -> list[Candidate]:
    """The ``top_k`` persons by their best cosine with ``probe``, best first."""
    best: dict[str, float] = {}
    if gallery.face_ids:
        for person_id, score in zip(gallery.person_ids, gallery.embeddings @ probe, strict=True):
            best[person_id] = max(best.get(person_id, -1.0), float(score))
    ranked = sorted(best.items(), key=lambda item: -item[1])[:top_k]
    return [Candidate(p, s) for p, s in ranked]
