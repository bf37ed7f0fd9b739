"""Every input of an evaluation and the checks that it is fair: faces, pairs, attack halves, disjointness, one E.

The faces an evaluation reads: the verification set (pairs) and the attacker/defender halves.

The verification set is exactly the faces that the pairs name, loaded once and indexed, so that
privacy metrics, replay attacks and verification all score the same images. The attack data is
split by identity with :func:`plugin_service.faces.split_identities`, the same split that
``advface train-shadow --half`` uses, so the defender's and the attacker's training data can
never share a person.

The paper's threat model, enforced: the attacker never trained on anyone the shadow model saw.

An attacker that shares identities with the defender's shadow would measure a leak that the
deployed system does not have (or hide one that it has), so the harness refuses to run rather
than print a number with that flaw. The shadow's training identities come from the bundle
manifest (``provenance["shadow_identities"]``, written by ``advface train-shadow``).

Checks that the recogniser and the bundle describe the same client-side extractor E.

Verification embeds the stored (protected) features with the recogniser's server-side head. That
head was trained on features of the recogniser's own E; if the bundle's E differs, every utility
number would measure a mismatch rather than the protection, so the harness refuses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plugin_service.bundle import Bundle, Manifest, extractor_mismatch
from plugin_service.evaluation.config import EvaluationError
from plugin_service.faces import FaceSet, load_face_folders, split_identities
from plugin_service.models.recognizer import Recognizer


@dataclass
class AttackData:
    """``--attack-data`` split by identity: the defender's half and the attacker's half."""

    roots: tuple[Path, ...]
    defender: FaceSet
    attacker: FaceSet


def load_attack_data(roots: Path | Sequence[Path], limit_per_identity: int | None = None,
                     max_identities: int | None = None) -> AttackData:
    """Loads the folder(s) and splits them into (defender, attacker) halves by identity.

    ``max_identities`` keeps the first identities in sorted order before splitting (for --quick);
    the split itself depends only on each name, so the halves are subsets of the full halves.
    """
    roots = (Path(roots),) if isinstance(roots, (str, Path)) else tuple(Path(r) for r in roots)
    faces = load_face_folders(roots, limit_per_identity=limit_per_identity)
    names = faces.identities[:max_identities] if max_identities else faces.identities
    defender, attacker = split_identities(names)
    if not defender or not attacker:
        raise ValueError(f"{', '.join(map(str, roots))}: {len(names)} identities leave one half empty; "
                         "the attack data needs more people")
    return AttackData(roots, faces.subset(defender), faces.subset(attacker))


def holdout(faces: FaceSet, every: int = 20) -> tuple[FaceSet, torch.Tensor]:
    """(training faces, validation images): every ``every``-th face is held out, as train-shadow does."""
    mask = torch.arange(len(faces)) % every == 0
    return faces.take((~mask).nonzero().flatten()), faces.images[mask]


def fingerprint(faces: FaceSet) -> str:
    """A hash of the faces' folder/identity/file names: which images a network was trained on, wherever they live."""
    h = hashlib.sha256()
    for p in faces.paths:
        h.update("/".join(Path(p).parts[-3:]).encode() + b"\n")
    return h.hexdigest()


def batch_order(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of ``range(n)``: batches mix identities, as a stream of enrolments would.

    The verification folder is sorted by identity; batching it in order would hand AdvFace's
    shadow model (which normalises with batch statistics) batches of one or two people.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def pick_examples(names: Sequence[str], k: int) -> torch.Tensor:
    """Indices of ``k`` faces of different identities, spread evenly over the sorted identities."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        first.setdefault(name, i)
    people = sorted(first)
    if k <= 0 or not people:
        return torch.zeros(0, dtype=torch.long)
    picks = np.linspace(0, len(people) - 1, num=min(k, len(people))).round().astype(int)
    return torch.tensor([first[people[i]] for i in dict.fromkeys(picks.tolist())], dtype=torch.long)


def select_privacy_faces(n_faces: int, limit: int | None, seed: int) -> torch.Tensor:
    """Indices of the faces scored for privacy: the first ``limit`` of the passes' seeded, identity-mixing order."""
    order = batch_order(n_faces, seed)
    return order[:limit] if limit else order


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


def require_same_extractor(recognizer: Recognizer, bundle: Bundle, what: str = "recogniser") -> None:
    """Raises :class:`EvaluationError` unless ``recognizer``'s E has exactly the bundle's weights."""
    reason = extractor_mismatch(recognizer, bundle)
    if reason:
        raise EvaluationError(f"the {what} does not fit the bundle: {reason}")
