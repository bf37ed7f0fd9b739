"""Checkpoints that resume, shared by every training job and by the evaluation's attacker training.

A checkpoint is a file this project wrote (model, optimiser and scheduler state, epoch,
RNG state); it is read back with ``weights_only=True`` all the same. The RNG state is the job's
own generator (batch order, augmentation) and torch's global ones, which dropout draws from:
without them a resumed run would draw other dropout masks than an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

class Checkpointer:
    """Saves after each epoch to ``<out>.ckpt`` (atomically) and restores on the next run."""

    def __init__(self, out: Path) -> None:
        self.path = Path(str(out) + ".ckpt")

    def save(self, epoch: int, generator: torch.Generator, **state: Any) -> None:
        payload = {k: v.state_dict() for k, v in state.items()}
        payload["epoch"] = epoch
        payload["generator"] = generator.get_state()
        payload["torch_rng"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            payload["cuda_rng"] = torch.cuda.get_rng_state_all()
        tmp = self.path.with_suffix(".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def restore(self, generator: torch.Generator, **state: Any) -> int:
        """Loads the last checkpoint into ``state``'s objects; returns the next epoch to run (0 if none)."""
        if not self.path.exists():
            return 0
        payload = torch.load(self.path, map_location="cpu", weights_only=True)
        for k, v in state.items():
            v.load_state_dict(payload[k])
        generator.set_state(payload["generator"])
        if "torch_rng" in payload:  # checkpoints written before it was saved resume without it
            torch.set_rng_state(payload["torch_rng"])
        if "cuda_rng" in payload and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
        log.info("resuming from %s after epoch %d", self.path, payload["epoch"] + 1)
        return int(payload["epoch"]) + 1

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
