"""What every training job shares: seeding, device choice, checkpoints that resume, and progress bars.

A checkpoint is a file this project wrote (model, optimiser and scheduler state, epoch,
RNG state); it is read back with ``weights_only=True`` all the same.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible")
    return torch.device(name)


def minibatches(n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``: shuffled when a generator is given, in order otherwise."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def progress(iterable: Any, total: int | None = None, desc: str = "", unit: str = "batch") -> tqdm:
    """A tqdm bar that stays quiet when ADVFACE_NO_PROGRESS is set (CI logs, tests)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=bool(os.environ.get("ADVFACE_NO_PROGRESS")))


class Checkpointer:
    """Saves after each epoch to ``<out>.ckpt`` (atomically) and restores on the next run."""

    def __init__(self, out: Path) -> None:
        self.path = Path(str(out) + ".ckpt")

    def save(self, epoch: int, generator: torch.Generator, **state: Any) -> None:
        payload = {k: v.state_dict() for k, v in state.items()}
        payload["epoch"] = epoch
        payload["generator"] = generator.get_state()
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
        log.info("resuming from %s after epoch %d", self.path, payload["epoch"] + 1)
        return int(payload["epoch"]) + 1

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
