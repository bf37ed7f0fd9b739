"""What every job shares, serving included: seeding, device choice, index batches and progress bars.

It sits below everything else (it imports neither models nor training nor evaluation), so the
engine, training and evaluation can all use it without importing each other.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


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
    try:
        return torch.device(name)
    except RuntimeError:  # torch's message lists twenty device types; name the usual ones
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 runs at speed on ``device``: a CUDA GPU with bfloat16 units, or a CPU for which
    oneDNN has bfloat16 kernels (AVX-512 and newer).

    Elsewhere autocast to bfloat16 falls back to slow kernels: on an AVX2-only CPU the PGD step ran
    8x slower than in float32 (README, Performance on CPU). Other device types are trusted.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


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


def default_cache_dir() -> Path:
    """Trained attackers: ``$ADVFACE_CACHE_DIR``, else ``$XDG_CACHE_HOME/advface/attackers``, else ``~/.cache/advface/attackers``."""
    if os.environ.get("ADVFACE_CACHE_DIR"):
        return Path(os.environ["ADVFACE_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "advface" / "attackers"


def judge_cache_dir() -> Path:
    """Judge/teacher embeddings, shared by distillation, fine-tuning and evaluation: beside the attackers."""
    return default_cache_dir().parent / "judge"
