"""Face images in, 160x160 RGB tensors in [0, 1] out: the one module every path uses to read faces.

Already-aligned 160x160 images (LFW-style crops, the shared CelebA faces) pass straight
through; anything else goes through facenet-pytorch's MTCNN, which finds the largest face and
crops it with the same margin the shared data used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from plugin_service.models.extractor import FACE_SIZE
from plugin_service.names import IDENTITY_HALVES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ALIGN_MARGIN = 14


class NoFaceFound(ValueError):
    """MTCNN found no face in an image; carries the path so batch jobs can report and skip it."""


@lru_cache(maxsize=1)
def _mtcnn():  # noqa: ANN202 - facenet_pytorch has no type hints
    from facenet_pytorch import MTCNN

    return MTCNN(image_size=FACE_SIZE, margin=ALIGN_MARGIN, post_process=False, select_largest=True)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def align(image: Image.Image, name: str = "image") -> torch.Tensor:
    """One face (3, 160, 160) in [0, 1]: pass-through when already 160x160, MTCNN otherwise."""
    image = image.convert("RGB")
    if image.size == (FACE_SIZE, FACE_SIZE):
        return to_tensor(image)
    face = _mtcnn()(image)
    if face is None:
        raise NoFaceFound(f"no face found in {name}")
    return (face / 255.0).clamp(0.0, 1.0)


def load_face(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return align(image, name=str(path))


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively), in a stable order."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class FaceSet:
    """Faces of an LFW-layout folder (``name/name_NNNN.jpg``) held in memory as uint8.

    uint8 keeps the whole shared public split (3.8k faces) under 300 MB, and decoding once
    makes each training epoch compute-bound instead of JPEG-bound.
    """

    images: torch.Tensor  # (N, 3, 160, 160) uint8
    labels: torch.Tensor  # (N,) int64, index into identities
    identities: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def floats(self, index: torch.Tensor | slice) -> torch.Tensor:
        return self.images[index].float() / 255.0

    def take(self, index: torch.Tensor) -> FaceSet:
        """The faces at ``index``, with the same identity list."""
        return FaceSet(self.images[index], self.labels[index], self.identities, [self.paths[i] for i in index.tolist()])

    def subset(self, identities: Sequence[str]) -> FaceSet:
        keep = set(identities)
        own = [self.identities[label] for label in self.labels.tolist()]
        idx = [i for i, name in enumerate(own) if name in keep]
        names = [n for n in self.identities if n in keep]
        remap = {n: i for i, n in enumerate(names)}
        labels = torch.tensor([remap[own[i]] for i in idx], dtype=torch.long)
        return FaceSet(self.images[idx], labels, names, [self.paths[i] for i in idx])


def load_face_folder(root: Path, limit_per_identity: int | None = None) -> FaceSet:
    """Reads an LFW-layout folder; faces that are not 160x160 are aligned with MTCNN."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"face folder not found: {root}")
    identities = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not identities:
        raise ValueError(f"{root} holds no identity folders (expected LFW layout name/name_NNNN.jpg)")
    images, labels, paths = [], [], []
    for label, name in enumerate(identities):
        files = list_images(root / name)[:limit_per_identity]
        for path in files:
            face = load_face(path)
            images.append((face * 255.0).round().to(torch.uint8))
            labels.append(label)
            paths.append(path)
    return FaceSet(torch.stack(images), torch.tensor(labels), identities, paths)


def load_face_folders(roots: Path | Sequence[Path], limit_per_identity: int | None = None) -> FaceSet:
    """Several LFW-layout folders as one set; identities are named ``<folder>/<name>`` so none merge."""
    if isinstance(roots, (str, Path)):
        roots = [Path(roots)]
    if len(roots) == 1:
        return load_face_folder(roots[0], limit_per_identity)
    sets = [load_face_folder(r, limit_per_identity) for r in roots]
    labels, names, offset = [], [], 0
    for root, s in zip(roots, sets):
        labels.append(s.labels + offset)
        names += [f"{Path(root).name}/{n}" for n in s.identities]
        offset += len(s.identities)
    return FaceSet(torch.cat([s.images for s in sets]), torch.cat(labels), names, [p for s in sets for p in s.paths])


def identity_of(path: Path, roots: Sequence[Path]) -> str:
    """The identity name :func:`load_face_folders` gives the face at ``path``."""
    return path.parent.name if len(roots) == 1 else f"{path.parent.parent.name}/{path.parent.name}"


@dataclass(frozen=True)
class Pair:
    left: Path
    right: Path
    same: bool
    fold: int


def read_pairs(pairs_file: Path, root: Path) -> list[Pair]:
    """Parses LFW ``pairs.txt``: a header ``folds n``, then per fold n matched and n mismatched lines."""
    lines = [line.split() for line in Path(pairs_file).read_text().splitlines() if line.strip()]
    folds, per = int(lines[0][0]), int(lines[0][1])

    def face(name: str, number: str) -> Path:
        return Path(root) / name / f"{name}_{int(number):04d}.jpg"

    pairs = []
    for i, parts in enumerate(lines[1:]):
        fold = i // (2 * per)
        if len(parts) == 3:
            pairs.append(Pair(face(parts[0], parts[1]), face(parts[0], parts[2]), True, fold))
        elif len(parts) == 4:
            pairs.append(Pair(face(parts[0], parts[1]), face(parts[2], parts[3]), False, fold))
        else:
            raise ValueError(f"{pairs_file}:{i + 2}: expected 3 or 4 fields, got {len(parts)}")
    if len(pairs) != folds * 2 * per:
        raise ValueError(f"{pairs_file}: header promises {folds * 2 * per} pairs, found {len(pairs)}")
    return pairs


def split_identities(identities: Sequence[str]) -> tuple[list[str], list[str]]:
    """Deterministic halves of an identity list: (defender, attacker).

    Membership depends only on a hash of each name, so the split is the same on every machine
    and for any subset of the folder, and no identity can fall on both sides.
    """
    import hashlib

    def side(name: str) -> int:
        return hashlib.sha256(name.encode()).digest()[0] % 2

    defender = sorted(n for n in identities if side(n) == 0)
    attacker = sorted(n for n in identities if side(n) == 1)
    return defender, attacker


def identity_half(identities: Sequence[str], half: str) -> list[str]:
    """The identities of ``half`` (:data:`plugin_service.names.IDENTITY_HALVES`): all, or one side of the split."""
    if half not in IDENTITY_HALVES:
        raise ValueError(f"unknown identity half {half!r}; choose one of {', '.join(IDENTITY_HALVES)}")
    return list(identities) if half == "all" else split_identities(identities)[IDENTITY_HALVES.index(half) - 1]
