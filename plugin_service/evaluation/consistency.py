"""Checks that the recogniser and the bundle describe the same client-side extractor E.

Verification embeds the stored (protected) features with the recogniser's server-side head. That
head was trained on features of the recogniser's own E; if the bundle's E differs, every utility
number would measure a mismatch rather than the protection, so the harness refuses.
"""

from __future__ import annotations

from plugin_service.bundle import Bundle, extractor_mismatch
from plugin_service.evaluation.errors import EvaluationError
from plugin_service.models.recognizer import Recognizer


def require_same_extractor(recognizer: Recognizer, bundle: Bundle, what: str = "recogniser") -> None:
    """Raises :class:`EvaluationError` unless ``recognizer``'s E has exactly the bundle's weights."""
    reason = extractor_mismatch(recognizer, bundle)
    if reason:
        raise EvaluationError(f"the {what} does not fit the bundle: {reason}")
