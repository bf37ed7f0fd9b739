"""Every verification face's stored features of a pass, kept on disk so later runs skip the protector.

An LFW pass of AdvFace is about 45 minutes of PGD on two CPU cores, while the recognisers and
attackers that read its output need a minute or two. Comparing XNN-d heads (or attackers) on the
same protected features would pay for the PGD every time, because a pass's cache key covers the
heads that score it. With ``advface evaluate --keep-features`` the main table's passes write what
they store, face by face, to a float16 ``.npy`` (0.76 MB a face: 5.8 GB for LFW's 7,701 faces),
and a later run with the same features key reads them back memory-mapped instead of protecting.

The key covers exactly what makes the features (bundle, protector settings, faces, batch order
and size, channels-last, device, seed) and nothing that reads them. ``.npy`` holds no pickle and
is loaded with ``allow_pickle=False``; the per-face numbers sit beside it in a safetensors file.
Both are written under temporary names and renamed only once every batch is in, the numbers
last, so an interrupted pass is never taken for a finished one. A run that keeps features
scores the float16-rounded features (as a replay reads them) even on its first pass, so the
first run and every replay report the same numbers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from plugin_service.evaluation.caches import cache_key
from plugin_service.evaluation.passes import Source
from plugin_service.protect.base import Protection

log = logging.getLogger(__name__)
PER_FACE = ("perturbation_norm", "shadow_loss_before", "shadow_loss_after")


@dataclass
class StoredPass:
    """A finished pass's stored features, (N, C, H, W) float16 memory-mapped, and its per-face numbers."""

    features: np.ndarray
    per_face: dict[str, torch.Tensor]

    def replay(self) -> Source:
        """A source that hands back what the pass stored for each face, without running the protector."""
        def source(idx: torch.Tensor, x: torch.Tensor) -> Protection:
            rows = idx.numpy()
            features = torch.from_numpy(np.ascontiguousarray(self.features[rows])).to(x.device).float()
            numbers = {k: v[idx].to(x.device) for k, v in self.per_face.items()}
            return Protection(features=features, **numbers)
        return source


class FeatureStore:
    """A directory of ``<key>.npy`` features with ``<key>.safetensors`` per-face numbers."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def key(self, fields: dict[str, Any]) -> str:
        return cache_key({"kind": "stored-features", **fields})

    def load(self, key: str, faces: int) -> StoredPass | None:
        """The finished pass under ``key``, or None when absent, unreadable or of another face count."""
        features, numbers = self.root / f"{key}.npy", self.root / f"{key}.safetensors"
        if not (features.is_file() and numbers.is_file()):
            return None
        try:
            array = np.load(features, mmap_mode="r", allow_pickle=False)
            per_face = load_file(str(numbers))
        except (SafetensorError, OSError, ValueError) as e:
            log.warning("stored features %s are unreadable (%s); protecting again", features.name, e)
            return None
        if len(array) != faces or array.dtype != np.float16 or any(len(v) != faces for v in per_face.values()):
            log.warning("stored features %s do not match the %d faces of this run; protecting again", features.name,
                        faces)
            return None
        return StoredPass(array, per_face)

    def recording(self, key: str, faces: int, protect: Source) -> tuple[Source, Callable[[], None]]:
        """``protect``, writing what it stores under ``key``; call the returned ``finish`` after the last batch.

        The source returns the float16-rounded features, the ones a replay will read.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        recording = _Recording(self.root, key, faces, protect)
        return recording, recording.finish


class _Recording:
    """One pass being written: the features fill a memory-mapped ``.partial.npy`` as batches come in."""

    def __init__(self, root: Path, key: str, faces: int, protect: Source) -> None:
        self.root, self.key, self.faces, self.protect = root, key, faces, protect
        self.partial = root / f"{key}.partial.npy"
        self.array: np.ndarray | None = None  # opened at the first batch, when the feature shape is known
        self.per_face: dict[str, torch.Tensor] = {}
        self.seen = torch.zeros(faces, dtype=torch.bool)

    def __call__(self, idx: torch.Tensor, x: torch.Tensor) -> Protection:
        out = self.protect(idx, x)
        rounded = out.features.to(torch.float16)
        if self.array is None:
            self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float16,
                                                   shape=(self.faces, *rounded.shape[1:]))
        self.array[idx.numpy()] = rounded.cpu().numpy()
        for name in PER_FACE:
            value = getattr(out, name)
            if value is not None:
                column = self.per_face.setdefault(name, torch.full((self.faces,), float("nan")))
                column[idx] = value.float().cpu()
        self.seen[idx] = True
        out.features = rounded.float()
        return out

    def finish(self) -> None:
        """Renames the features, then the per-face numbers, into place; refuses an incomplete pass."""
        if self.array is None or not bool(self.seen.all()):
            raise RuntimeError("a pass ended before every face was protected; nothing was stored")
        self.array.flush()
        self.array = None  # closes the memory map before the rename
        os.replace(self.partial, self.root / f"{self.key}.npy")
        tmp = self.root / f"{self.key}.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.per_face.items()}, str(tmp))
        os.replace(tmp, self.root / f"{self.key}.safetensors")
        log.info("stored features of %d faces kept for later runs (%s)", self.faces, self.key[:12])
