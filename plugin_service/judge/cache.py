"""A disk cache of judge/teacher embeddings, keyed by the pixels of each face.

dlib costs about 60 ms a face on one core, and distillation reads every training face every
epoch, so each face is embedded once. The key is the sha256 of the decoded uint8 face, so an
edited image gets a new embedding and a renamed or copied one reuses its old embedding; the
model name is part of the file name, so two judges never mix.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

log = logging.getLogger(__name__)

Embedder = Callable[[torch.Tensor], torch.Tensor]


def face_key(face: torch.Tensor) -> bytes:
    """sha256 of one uint8 face's pixels."""
    return hashlib.sha256(face.contiguous().numpy().tobytes()).digest()


class EmbeddingCache:
    """Embeddings of uint8 faces (N, 3, H, W) under ``<directory>/<model>.safetensors``.

    Arguments:
        directory (Path): where the cache file lives (created on first save).
        model (str): the embedder's name; part of the file name.
        save_every (int): faces computed between saves, so an interrupted run keeps its work.
    """

    def __init__(self, directory: Path, model: str, save_every: int = 512) -> None:
        self.path = Path(directory) / f"{model}.safetensors"
        self.save_every = save_every
        self._index: dict[bytes, int] = {}
        self._rows: list[torch.Tensor] = []
        if self.path.is_file():
            state = load_file(str(self.path))
            keys, emb = state["keys"], state["embeddings"]
            self._rows = list(emb)
            self._index = {bytes(k.tolist()): i for i, k in enumerate(keys)}
            log.info("embedding cache %s: %d faces", self.path, len(self._index))

    def __len__(self) -> int:
        return len(self._index)

    def embed(self, faces: torch.Tensor, embedder: Embedder, batch_size: int = 32, desc: str = "embedding") -> torch.Tensor:
        """(N, D) embeddings of uint8 ``faces``: cached rows, the rest computed by ``embedder`` and stored."""
        if faces.dtype != torch.uint8:
            raise TypeError("the embedding cache keys uint8 faces; convert with (x * 255).round()")
        keys = [face_key(f) for f in faces]
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        todo = sorted(i for k, i in first.items() if k not in self._index)
        if todo:
            log.info("%s: %d of %d faces not cached yet", desc, len(todo), len(faces))
        unsaved = 0
        bar = tqdm(total=len(todo), desc=desc, unit="face", leave=False, dynamic_ncols=True,
                   disable=bool(os.environ.get("ADVFACE_NO_PROGRESS")))
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            emb = embedder(faces[idx]).float().cpu()
            for i, row in zip(idx, emb):
                self._index[keys[i]] = len(self._rows)
                self._rows.append(row)
            unsaved += len(idx)
            bar.update(len(idx))
            if unsaved >= self.save_every:
                self.save()
                unsaved = 0
        bar.close()
        if unsaved:
            self.save()
        return torch.stack([self._rows[self._index[k]] for k in keys]) if keys else torch.zeros(0, 0)

    def save(self) -> None:
        """Writes the whole cache atomically (a killed run leaves the previous file intact)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self._index, key=self._index.__getitem__)
        state = {"keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8),
                 "embeddings": torch.stack(self._rows).contiguous()}
        tmp = self.path.with_suffix(".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, self.path)
