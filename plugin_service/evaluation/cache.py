"""Trained attackers and shadows, cached as safetensors under a hash of everything that made them.

Training a reconstruction network is the slowest part of an evaluation and its result is a pure
function of the recipe (bundle, architecture, sizes, epochs, seed, training images, protection),
so the key is a SHA-256 of exactly those fields: change any of them and the network is retrained,
change nothing and a rerun loads it in a second. Files are safetensors (no pickle), written
atomically, and a file that fails to load is treated as absent and retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

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
