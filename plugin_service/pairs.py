"""The faces an LFW-format pairs file names, loaded once and indexed, for verification.

Training reports its accuracy with it and evaluation scores every protector on it, so both
read the same faces in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plugin_service.faces import Pair, load_face, read_pairs
from plugin_service.runtime import progress


@dataclass(frozen=True)
class PairIndex:
    """Verification pairs as indices into an :class:`EvalFaces` set."""

    left: np.ndarray  # (P,) int, the enrolled side (stored, protected feature)
    right: np.ndarray  # (P,) int, the probe side (a fresh, clean face)
    same: np.ndarray  # (P,) bool
    folds: np.ndarray  # (P,) int

    def __len__(self) -> int:
        return len(self.left)


@dataclass
class EvalFaces:
    """The faces the pairs name, as uint8, with each face's identity and the pair indices."""

    images: torch.Tensor  # (N, 3, 160, 160) uint8
    paths: list[Path]
    names: list[str]  # identity of each face (its folder name)
    pairs: PairIndex

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def identities(self) -> list[str]:
        return sorted(set(self.names))


def subsample_pairs(pairs: Sequence[Pair], per_fold: int | None) -> list[Pair]:
    """The first ``per_fold`` matched and first ``per_fold`` mismatched pairs of every fold.

    Keeping both classes in every fold keeps the 10-fold protocol valid on a tiny subset.
    """
    if per_fold is None:
        return list(pairs)
    kept: list[Pair] = []
    counts: dict[tuple[int, bool], int] = {}
    for pair in pairs:
        key = (pair.fold, pair.same)
        if counts.get(key, 0) < per_fold:
            counts[key] = counts.get(key, 0) + 1
            kept.append(pair)
    return kept


def load_eval_faces(root: Path, pairs_file: Path, per_fold: int | None = None) -> EvalFaces:
    """Reads the faces named by an LFW-format ``pairs_file`` over the LFW-layout folder ``root``."""
    pairs = subsample_pairs(read_pairs(pairs_file, root), per_fold)
    paths = sorted({p for pair in pairs for p in (pair.left, pair.right)})
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} faces named in {pairs_file} are missing, e.g. {missing[0]}")
    index = {p: i for i, p in enumerate(paths)}
    images = torch.stack([(load_face(p) * 255.0).round().to(torch.uint8)
                          for p in progress(paths, desc="loading faces", unit="face")])
    pair_index = PairIndex(
        left=np.array([index[p.left] for p in pairs]),
        right=np.array([index[p.right] for p in pairs]),
        same=np.array([p.same for p in pairs], dtype=bool),
        folds=np.array([p.fold for p in pairs]),
    )
    return EvalFaces(images, paths, [p.parent.name for p in paths], pair_index)
