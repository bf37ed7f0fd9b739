"""On-disk caches that make reruns cheap: trained networks and finished protector passes.

Trained attackers and shadows are cached as safetensors under a SHA-256 of everything that made
them. Training a reconstruction network is the slowest part of an evaluation and its result is a
pure function of the recipe (bundle, architecture, sizes, epochs, seed, training images,
protection): change any field and the network is retrained, change nothing and a rerun loads it
in a second.

Finished protector passes are kept too, so an evaluation that stops part-way resumes where it
was. An LFW-scale evaluation protects 7,701 faces with each protector, hours of CPU for AdvFace
and resynth alone. A pass is a pure function of its inputs (bundle, protector settings, faces and
their batch order, the attackers and recognisers that score it, the device), so its summary, the
example reconstructions and the stored features the tiers attack are saved under a SHA-256 of
exactly those inputs.

Files are safetensors (no pickle), written atomically; a file that fails to load is treated as
absent and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from plugin_service.models.extractor import freeze
from plugin_service.models.shadow import ShadowSpec, build_shadow

log = logging.getLogger(__name__)
KEY_VERSION = 1  # bump when the training code changes what a recipe produces


def cache_key(fields: dict[str, Any]) -> str:
    """SHA-256 over the recipe's fields (sorted JSON), with the cache format version."""
    blob = json.dumps({"version": KEY_VERSION, **fields}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class ModelCache:
    """A directory of ``<key>.safetensors`` reconstruction networks; ``root=None`` disables caching."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def path(self, key: str) -> Path | None:
        return self.root / f"{key}.safetensors" if self.root is not None else None

    def load(self, key: str, spec: ShadowSpec) -> tuple[nn.Module, dict[str, str]] | None:
        """The frozen network and its metadata, or None when absent, unreadable or of another spec."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            if json.loads(meta.get("spec", "null")) != asdict(spec):
                log.warning("cached network %s was made for another architecture; retraining", path.name)
                return None
            model = build_shadow(spec)
            model.load_state_dict(load_file(str(path)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            log.warning("cached network %s is unreadable (%s); retraining", path.name, e)
            return None
        return freeze(model), meta

    def save(self, key: str, model: nn.Module, spec: ShadowSpec, meta: dict[str, str]) -> Path | None:
        path = self.path(key)
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={**meta, "spec": json.dumps(asdict(spec))})
        os.replace(tmp, path)
        return path

FEATURES = "features"
EXAMPLE = "example."


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes, values): two networks with equal digests compute alike."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def tensor_digest(values: torch.Tensor | Iterable[Any]) -> str:
    """SHA-256 of an index tensor or of a list of JSON-able items (face names, pairs)."""
    if isinstance(values, torch.Tensor):
        return hashlib.sha256(values.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
    return hashlib.sha256(json.dumps(list(values), default=str).encode()).hexdigest()


@dataclass
class CachedPass:
    """What a pass leaves behind for the rest of the run."""

    record: dict[str, Any]
    examples: dict[str, torch.Tensor]  # attacker -> (K, 3, 160, 160) reconstructions of the example faces
    features: torch.Tensor | None  # stored features of the kept faces, float16


class PassCache:
    """A directory of ``<key>.safetensors`` passes; ``root=None`` disables it."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root is not None else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def key(self, fields: dict[str, Any]) -> str:
        return cache_key({"kind": "evaluation-pass", **fields})

    def _path(self, key: str) -> Path | None:
        return self.root / f"{key}.safetensors" if self.root is not None else None

    def load(self, key: str) -> CachedPass | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                record = json.loads((f.metadata() or {})["record"])
            tensors = load_file(str(path))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            log.warning("cached pass %s is unreadable (%s); recomputing it", path.name, e)
            return None
        examples = {k[len(EXAMPLE):]: v for k, v in tensors.items() if k.startswith(EXAMPLE)}
        return CachedPass(record, examples, tensors.get(FEATURES))

    def save(self, key: str, done: CachedPass) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{EXAMPLE}{k}": v.contiguous() for k, v in done.examples.items()}
        if done.features is not None:
            tensors[FEATURES] = done.features.contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"record": json.dumps(done.record)})
        os.replace(tmp, path)
