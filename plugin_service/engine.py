"""The serving engine: NumPy batches in, protected NumPy batches out, on the chosen device.

This is the boundary between the service and PyTorch. It knows nothing of gRPC; the server
knows nothing of torch. Each call is independent: the bundle's models are frozen and shared,
and per-batch BatchNorm statistics live only inside the call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plugin_service.bundle import Bundle
from plugin_service.protect import ProtectorParams, build_protector
from plugin_service.runtime import pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineResult:
    features: np.ndarray  # same shape and dtype as the input
    shadow_loss_before: np.ndarray  # (N,), NaN for protectors without a shadow model
    shadow_loss_after: np.ndarray
    perturbation_norm: np.ndarray
    compute_seconds: float
    cosine: np.ndarray  # (N,) resynth: cos(R(stored), R(z)); NaN for other protectors
    steps: np.ndarray  # (N,) resynth: optimiser steps; NaN for other protectors


class Engine:
    """Runs protectors of one bundle on one device."""

    def __init__(self, bundle: Bundle, device: str = "auto", torch_threads: int = 0) -> None:
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.device = pick_device(device)
        self.bundle = bundle.to(self.device)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return tuple(self.bundle.manifest.feature_shape)  # type: ignore[return-value]

    def default_params(self) -> dict[str, Any]:
        return build_protector("advface", self.bundle).params()

    def protect(self, features: np.ndarray, protector: str = "advface",
                params: ProtectorParams = ProtectorParams()) -> EngineResult:
        """Protects one batch exactly as the client grouped it (its faces share BN statistics)."""
        start = time.perf_counter()
        engine = build_protector(protector, self.bundle, params)
        z = torch.from_numpy(features).to(self.device)
        result = engine(z)
        nan = np.full(len(features), np.nan, dtype=np.float32)

        def host(t: torch.Tensor | None) -> np.ndarray:
            return nan if t is None else t.detach().float().cpu().numpy()

        out = result.features.detach().cpu().numpy().astype(features.dtype, copy=False)  # .cpu() waits for the device
        return EngineResult(out, host(result.shadow_loss_before), host(result.shadow_loss_after),
                            host(result.perturbation_norm), time.perf_counter() - start, host(result.cosine),
                            host(result.steps))

    def warm_up(self, faces: int = 2) -> float:
        """Runs one batch of random features so the first client batch pays no start-up cost."""
        rng = np.random.default_rng(0)
        z = rng.random((faces, *self.feature_shape), dtype=np.float32)
        return self.protect(z).compute_seconds

    def peak_memory(self) -> int:
        """Peak device memory allocated since the last call, in bytes (0 on CPU); PGD peaks mid-batch."""
        if self.device.type != "cuda":
            return 0
        peak = int(torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def memory_capacity(self) -> int:
        return int(torch.cuda.mem_get_info(self.device)[1]) if self.device.type == "cuda" else 0
