"""The faces an evaluation reads: the verification set (pairs) and the attacker/defender halves.

The verification set is exactly the faces that the pairs name, loaded once and indexed, so that
privacy metrics, replay attacks and verification all score the same images. The attack data is
split by identity with :func:`plugin_service.faces.split_identities`, the same split that
``advface train-shadow --half`` uses, so the defender's and the attacker's training data can
never share a person.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plugin_service.faces import FaceSet, load_face_folders, split_identities


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
