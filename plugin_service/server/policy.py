"""The operator's limits on what a client may ask for per batch."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from plugin_service.protect import PROTECTORS, ProtectorParams
from plugin_service.server.codec import BatchError, Options


@dataclass(frozen=True)
class Policy:
    protectors: tuple[str, ...]
    max_steps: int
    min_eps: float
    max_eps: float
    max_batch: int
    default_protector: str = "advface"

    def resolve(self, batch_id: str, options: Options) -> tuple[str, ProtectorParams]:
        """Checks a batch's options; returns the protector name and its parameters."""
        name = options.protector or self.default_protector
        if name not in PROTECTORS:
            raise BatchError(batch_id, grpc.StatusCode.INVALID_ARGUMENT,
                             f"unknown protector {name!r}; this server offers {', '.join(self.protectors)}")
        if name not in self.protectors:
            raise BatchError(batch_id, grpc.StatusCode.PERMISSION_DENIED,
                             f"protector {name!r} is not enabled on this server; it offers {', '.join(self.protectors)}")
        if options.steps and not 1 <= options.steps <= self.max_steps:
            raise BatchError(batch_id, grpc.StatusCode.OUT_OF_RANGE,
                             f"steps={options.steps} is outside the operator's policy [1, {self.max_steps}]")
        if options.eps is not None and not self.min_eps - 1e-6 <= options.eps <= self.max_eps + 1e-6:
            raise BatchError(batch_id, grpc.StatusCode.OUT_OF_RANGE,
                             f"eps={options.eps:g} is outside the operator's policy [{self.min_eps:g}, {self.max_eps:g}]")
        return name, ProtectorParams(steps=options.steps or None, eps=options.eps)
