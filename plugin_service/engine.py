"""The serving engine: NumPy batches in, protected NumPy batches out, on the chosen device.

This is the boundary between the service and PyTorch. It knows nothing of gRPC; the server
knows nothing of torch. Each call is independent: the bundle's models are frozen and shared,
and per-batch BatchNorm statistics live only inside the call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from plugin_service import hostmem
from plugin_service.bundle import Bundle
from plugin_service.engine_settings import EngineSettings
from plugin_service.protect import Protector, ProtectorParams, build_protector
from plugin_service.protect.early_stop import EarlyStop
from plugin_service.protect.pgd_fast import FastAdvFace
from plugin_service.protect.shadow_step import ShadowStep
from plugin_service.runtime import native_bfloat16, pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineResult:
    features: np.ndarray  # same shape and dtype as the input
    shadow_loss_before: np.ndarray  # (N,), NaN for protectors without a shadow model
    shadow_loss_after: np.ndarray
    perturbation_norm: np.ndarray
    compute_seconds: float
    cosine: np.ndarray  # (N,) resynth: cos(R(stored), R(z)); NaN for other protectors
    steps: np.ndarray  # (N,) resynth: optimiser steps; advface (optimised engine): PGD steps taken; else NaN


class Engine:
    """Runs protectors of one bundle on one device, with the speed-ups ``settings`` switch on.

    ``EngineSettings.reference()`` runs today's plain eager loop; `advface bench` runs both in one
    process on the same inputs.
    """

    def __init__(self, bundle: Bundle, device: str = "auto", torch_threads: int = 0,
                 settings: EngineSettings = EngineSettings()) -> None:
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.device = pick_device(device)
        self.bundle = bundle.to(self.device)
        settings = settings.validate()
        if settings.bf16 and not native_bfloat16(self.device):
            # A fleet shares one configuration across hosts; a host without bfloat16 kernels runs
            # float32 rather than 8x slower, and says so once.
            detail = (f"CPU capability {torch.backends.cpu.get_cpu_capability()}" if self.device.type == "cpu"
                      else "torch.cuda.is_bf16_supported() is false")
            log.warning("--bf16 is ignored on %s: it has no native bfloat16 kernels (%s), and on such an AVX2 CPU "
                        "bfloat16 ran 8x slower than float32; the engine runs float32", self.device, detail)
            settings = replace(settings, bf16=False)
        self.settings = settings
        if settings.channels_last:
            self.bundle.shadow.to(memory_format=torch.channels_last)
        # One step function per engine: its compilation (once per batch size) outlives each call's protector.
        self._step = None if settings.is_reference else ShadowStep(
            self.bundle.shadow, compile=settings.compile, autocast_dtype=torch.bfloat16 if settings.bf16 else None)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return tuple(self.bundle.manifest.feature_shape)  # type: ignore[return-value]

    def default_params(self) -> dict[str, Any]:
        return build_protector("advface", self.bundle).params()

    def protector(self, name: str, params: ProtectorParams = ProtectorParams(),
                  generator: torch.Generator | None = None) -> Protector:
        """The named protector on this engine's models; AdvFace with the engine's speed-ups unless reference."""
        if name != "advface" or self._step is None:
            return build_protector(name, self.bundle, params, generator)
        p = params.resolved(self.bundle)
        assert p.steps is not None and p.alpha is not None and p.eps is not None and p.norm is not None
        s = self.settings
        return FastAdvFace(self.bundle.extractor, self.bundle.shadow, self._step, eps=p.eps, alpha=p.alpha,
                           steps=p.steps, norm=p.norm, channels_last=s.channels_last,
                           early_stop=EarlyStop(s.patience, s.min_gain) if s.early_stop else None,
                           check_every=s.check_every, keep_best=s.keep_best)

    def protect(self, features: np.ndarray, protector: str = "advface",
                params: ProtectorParams = ProtectorParams(), generator: torch.Generator | None = None) -> EngineResult:
        """Protects one batch exactly as the client grouped it (its faces share BN statistics)."""
        start = time.perf_counter()
        hostmem.set_reuse(self.settings.reuse_host_memory)  # process-wide: set per call so engines can alternate
        engine = self.protector(protector, params, generator)
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
