"""Tiny synthetic inputs for the evaluation: LFW-layout face folders, pairs files, models.

A fresh clone has no face data and no trained weights, yet the harness has to be testable in
seconds. These builders make the smallest inputs with the real formats: JPEG folders that
:func:`plugin_service.faces.load_face_folder` reads, a ``pairs.txt`` that
:func:`plugin_service.faces.read_pairs` parses, a bundle that :func:`load_bundle` validates
(with its shadow identities recorded) and a recogniser that shares the bundle's E. Images are
smooth random patterns per identity plus per-image jitter, so identities are distinguishable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from plugin_service.bundle import Manifest, save_bundle
from plugin_service.models.extractor import FACE_SIZE, Extractor
from plugin_service.models.recognizer import Recognizer, RecognizerSpec
from plugin_service.models.shadow import ShadowSpec, build_shadow


def write_face_folder(root: Path, identities: int, per_identity: int, seed: int = 0, prefix: str = "person") -> list[str]:
    """Writes ``root/NAME/NAME_NNNN.jpg`` (160x160) for ``identities`` people; returns their names."""
    rng = torch.Generator().manual_seed(seed)
    names = [f"{prefix}_{i:03d}" for i in range(identities)]
    for name in names:
        base = F.interpolate(torch.rand(1, 3, 5, 5, generator=rng), size=(FACE_SIZE, FACE_SIZE), mode="bicubic",
                             align_corners=False)
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(1, per_identity + 1):
            image = (base + 0.08 * torch.randn(base.shape, generator=rng)).clamp(0, 1)[0]
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(root / name / f"{name}_{k:04d}.jpg", quality=95)
    return names


def write_pairs(path: Path, names: Sequence[str], per_identity: int, folds: int = 10, per_fold: int = 1) -> Path:
    """An LFW-format pairs file: per fold ``per_fold`` matched then ``per_fold`` mismatched pairs."""
    if per_identity < 2 or len(names) < 2:
        raise ValueError("pairs need at least two identities with two images each")
    lines = [f"{folds}\t{per_fold}"]
    n = len(names)
    for f in range(folds):
        for k in range(per_fold):
            i = (f * per_fold + k) % n
            lines.append(f"{names[i]}\t1\t{2 + (f + k) % (per_identity - 1)}")
        for k in range(per_fold):
            i = (f * per_fold + k) % n
            j = (i + 1 + k) % n
            lines.append(f"{names[i]}\t{1 + k % per_identity}\t{names[j]}\t{1 + (k + 1) % per_identity}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_bundle(path: Path, spec: ShadowSpec = ShadowSpec("resrec", 4, 1), shadow_identities: Sequence[str] | None = (),
                 seed: int = 0, extractor: Extractor | None = None) -> Extractor:
    """A bundle with a random E and S; ``shadow_identities=None`` leaves them out of the manifest."""
    torch.manual_seed(seed)
    extractor = extractor or Extractor().eval()
    shadow = build_shadow(spec).eval()
    provenance = {"shadow_data": "synthetic", "shadow_epochs": "1", "shadow_seed": str(seed)}
    if shadow_identities is not None:
        provenance["shadow_identities"] = ",".join(shadow_identities)
    save_bundle(path, Manifest(split="conv2d_2b", shadow=spec, feature_shape=extractor.feature_shape(),
                               provenance=provenance), extractor, shadow)
    return extractor


def write_recognizer(path: Path, extractor: Extractor, width: int = 4, embedding_dim: int = 16, seed: int = 0) -> Recognizer:
    """A light recogniser with a random head whose E is ``extractor``'s exact weights."""
    torch.manual_seed(seed)
    model = Recognizer(RecognizerSpec("light", extractor.split, embedding_dim, width))
    model.extractor.load_facenet_state(extractor.facenet_state())
    model.eval()
    model.save(path)
    return model
