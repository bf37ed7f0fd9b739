"""One PGD step's heavy part: the shadow's per-face L1 loss and its gradient, compiled when possible.

The engine builds one :class:`ShadowStep` per bundle and keeps it, because ``torch.compile``
compiles once per input shape (one batch size, fixed for the 40 steps of a batch) and a
protector is built per call. When compilation is unavailable or fails, the step logs one line
and runs eagerly from then on; the eager step computes the same function.

With an ``autocast_dtype`` (bfloat16: `advface serve --bf16`) the shadow's forward and backward
run under autocast in both paths; the per-face loss and the gradient come back as float32, so
delta, its projection and the stored features stay float32.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class ShadowLoss(nn.Module):
    """Per-face mean L1 between S(x) and the target image: (N, C, H, W), (N, 3, 160, 160) -> (N,) float32.

    The autocast block sits inside the module, so ``torch.compile`` traces it into the graph
    instead of depending on the caller's autocast state.
    """

    def __init__(self, shadow: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.shadow, self.autocast_dtype = shadow, autocast_dtype

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            per_face = F.l1_loss(self.shadow(x), target, reduction="none").flatten(1).mean(dim=1)
        return per_face.float()


class ShadowStep:
    """``(base, delta, target) -> (per-face loss at base + delta, d loss / d delta)``; compiled or eager.

    Arguments:
        shadow (nn.Module): S, frozen; called inside the caller's ``batch_statistics()`` block.
        compile (bool): compile the loss (and, through AOTAutograd, its backward) with ``torch.compile``.
        backend (str | Callable): ``torch.compile`` backend. (Default: 'inductor')
        autocast_dtype (torch.dtype | None): run the shadow under ``torch.autocast`` with this dtype
            (``torch.bfloat16``) on the input's device type; None runs it in float32. (Default: None)
    """

    def __init__(self, shadow: nn.Module, compile: bool = True, backend: str | Callable = "inductor",
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.eager = ShadowLoss(shadow, autocast_dtype)
        self.compiled: Callable | None = torch.compile(self.eager, backend=backend, dynamic=False) if compile else None
        self._lock = threading.Lock()

    @property
    def compiling(self) -> bool:
        return self.compiled is not None

    def __call__(self, base: torch.Tensor, delta: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled is not None:
            try:
                return self._run(self.compiled, base, delta, target)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, once, loudly
                with self._lock:
                    if self.compiled is not None:
                        log.warning("torch.compile of the PGD step failed (%s: %s); running the eager step from now on",
                                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                        self.compiled = None
        return self._run(self.eager, base, delta, target)

    @staticmethod
    def _run(loss_fn: Callable, base: torch.Tensor, delta: torch.Tensor,
             target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = delta.detach().requires_grad_(True)
        per_face = loss_fn(base + delta, target)
        (grad,) = torch.autograd.grad(per_face.sum(), delta)
        return per_face.detach(), grad
