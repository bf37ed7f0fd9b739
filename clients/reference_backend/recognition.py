"""E and R from one model bundle: faces -> z on the backend, and features -> unit embeddings.

The backend must use the plug-in's bundle: R only recognises features of the E it was trained
with, and the plug-in protects features of its own E. Every answer from the plug-in names its
bundle version, which the backend checks against :attr:`Recognition.bundle_version`.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import torch

from plugin_service.bundle import load_bundle


class Recognition:
    """The frozen E + R of a bundle, run on the CPU one call at a time (a lock bounds CPU use)."""

    def __init__(self, bundle: Path | str | None = None) -> None:
        loaded = load_bundle(bundle)
        self.recognizer, _ = loaded.require_recognizer("the reference backend")
        self.bundle_version = loaded.version
        self.feature_shape = tuple(loaded.manifest.feature_shape)
        self.version = _weights_version(self.recognizer.flat_state())
        self._lock = threading.Lock()

    def features(self, faces: torch.Tensor) -> np.ndarray:
        """E(faces): (N, 3, 160, 160) in [0, 1] -> clean features z, float32 (N, C, H, W)."""
        with self._lock, torch.no_grad():
            return self.recognizer.extractor(faces).numpy()

    def embed(self, features: np.ndarray) -> np.ndarray:
        """R(features): stored (protected) or probe (clean) features -> (N, D) float32 unit vectors."""
        x = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: stored rows are read-only buffers
        with self._lock, torch.no_grad():
            return self.recognizer.embed_features(x).numpy()


def _weights_version(state: dict[str, torch.Tensor]) -> str:
    """A short hash of E's and R's weights: names the R that computed a stored embedding."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].numpy().tobytes())
    return h.hexdigest()[:12]
