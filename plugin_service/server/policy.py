"""The operator's limits on what a client may ask for per batch, and on the bundle's own defaults.

A bundle's PGD defaults are what clients get when they leave steps/eps unset, so a bundle whose
defaults lie outside the policy is refused at start-up (:meth:`Policy.check_defaults`) rather
than silently served. Client-sent names are echoed bounded (a protector name may be megabytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from plugin_service.names import PROTECTORS
from plugin_service.protector_params import ProtectorParams
from advface.codec import BatchError, Options, shown_id


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
                             f"unknown protector {shown_id(name)!r}; this server offers {', '.join(self.protectors)}")
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

    def check_defaults(self, steps: int, eps: float) -> str | None:
        """Why a bundle's PGD defaults (used when a client sets none) break this policy, or None."""
        if "advface" not in self.protectors and "random" not in self.protectors:
            return None  # no protector of this server uses them
        if not self.min_eps - 1e-6 <= eps <= self.max_eps + 1e-6:
            return (f"the bundle's default eps={eps:g} is outside the policy [--min-eps {self.min_eps:g}, "
                    f"--max-eps {self.max_eps:g}]; widen the policy or serve a bundle made for it")
        if not 1 <= steps <= self.max_steps:
            return (f"the bundle's default steps={steps} is outside the policy [1, --max-steps {self.max_steps}]; "
                    "widen the policy or serve a bundle made for it")
        return None
