"""Checks that the recogniser and the bundle describe the same client-side extractor E.

Verification embeds the stored (protected) features with the recogniser's server-side head. That
head was trained on features of the recogniser's own E; if the bundle's E differs, every utility
number would measure a mismatch rather than the protection, so the harness refuses.
"""

from __future__ import annotations

import torch

from plugin_service.bundle import Bundle
from plugin_service.evaluation.errors import EvaluationError
from plugin_service.models.recognizer import Recognizer


def require_same_extractor(recognizer: Recognizer, bundle: Bundle, what: str = "recogniser") -> None:
    """Raises :class:`EvaluationError` unless ``recognizer``'s E has exactly the bundle's weights."""
    ours = recognizer.extractor.facenet_state()
    theirs = bundle.extractor.facenet_state()
    if recognizer.spec.split != bundle.manifest.split or set(ours) != set(theirs):
        raise EvaluationError(f"the {what} splits E at {recognizer.spec.split}, the bundle at {bundle.manifest.split}")
    differing = [k for k in ours if not torch.equal(ours[k].cpu(), theirs[k].cpu())]
    if differing:
        raise EvaluationError(
            f"the {what}'s extractor E differs from the bundle's ({len(differing)} tensors, e.g. {differing[0]}); "
            "evaluate with the recogniser whose weights trained the bundle (train-shadow --extractor)")
