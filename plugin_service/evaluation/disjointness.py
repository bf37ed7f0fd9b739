"""The paper's threat model, enforced: the attacker never trained on anyone the shadow model saw.

An attacker that shares identities with the defender's shadow would measure a leak that the
deployed system does not have (or hide one that it has), so the harness refuses to run rather
than print a number with that flaw. The shadow's training identities come from the bundle
manifest (``provenance["shadow_identities"]``, written by ``advface train-shadow``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from plugin_service.bundle import Manifest
from plugin_service.evaluation.errors import EvaluationError

SHADOW_IDENTITIES = "shadow_identities"


class DisjointnessError(EvaluationError):
    """The attacker's training identities overlap the bundle shadow's (or are unknown)."""


@dataclass(frozen=True)
class DisjointnessCheck:
    """What was checked, for the report; ``verified`` is False only when explicitly allowed."""

    shadow_identities: int | None  # None: the manifest does not say
    attacker_identities: int
    overlap: int
    verified: bool


def shadow_identities(manifest: Manifest) -> list[str] | None:
    """The identities the bundle's shadow trained on, or None if the manifest does not record them."""
    raw = manifest.provenance.get(SHADOW_IDENTITIES)
    if raw is None:
        return None
    return [name.strip() for name in raw.split(",") if name.strip()]


def check_disjoint(manifest: Manifest, attacker_identities: Sequence[str], allow_unknown: bool = False) -> DisjointnessCheck:
    """Raises :class:`DisjointnessError` unless the attacker's identities and the shadow's are disjoint.

    ``allow_unknown`` lets a bundle without recorded shadow identities (e.g. one made elsewhere)
    through; the report then says the check could not be made.
    """
    shadow = shadow_identities(manifest)
    if shadow is None:
        if not allow_unknown:
            raise DisjointnessError(
                f"the bundle manifest has no provenance[{SHADOW_IDENTITIES!r}], so the harness cannot verify "
                "that the attackers train on people the shadow never saw; retrain the bundle with "
                "`advface train-shadow --half defender`, or pass --allow-unknown-shadow-data to evaluate anyway")
        return DisjointnessCheck(None, len(attacker_identities), 0, verified=False)
    overlap = sorted(set(shadow) & set(attacker_identities))
    if overlap:
        raise DisjointnessError(
            f"{len(overlap)} of the attacker's {len(attacker_identities)} training identities were in the bundle "
            f"shadow's training data (e.g. {', '.join(overlap[:3])}); train the bundle on the defender half "
            "(`advface train-shadow --half defender`) of the folder passed as --attack-data")
    return DisjointnessCheck(len(shadow), len(attacker_identities), 0, verified=True)
