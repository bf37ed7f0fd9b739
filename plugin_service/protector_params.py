"""The per-call protector parameters a client or job may set: pure data, no PyTorch (names: ``names.py``).

The server's policy checks requests against these before anything reaches the device, and it
must stay importable without torch (the servicer knows nothing of PyTorch), so they live here
rather than in :mod:`plugin_service.protect`, whose package imports the torch protectors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plugin_service.bundle import Bundle


@dataclass(frozen=True)
class ProtectorParams:
    """Per-call settings; None means 'the bundle's default'."""

    steps: int | None = None
    alpha: float | None = None
    eps: float | None = None
    norm: str | None = None
    dp_epsilon: float = 1.0
    dp_bound: float = 3.0
    target_cosine: float | None = None  # resynth; None: the bundle's

    def resolved(self, bundle: Bundle) -> ProtectorParams:
        d = bundle.manifest.pgd
        return replace(self, steps=d.steps if self.steps is None else self.steps,
                       alpha=d.alpha if self.alpha is None else self.alpha,
                       eps=d.eps if self.eps is None else self.eps,
                       norm=d.norm if self.norm is None else self.norm)
