"""How the engine computes: one typed object for every speed-up, with its flags and environment variables.

Each field switches one optimisation on or off, so `advface bench` can measure each against the
plain eager loop (:meth:`EngineSettings.reference`) and the tests can check that each gives the
reference's results. `advface serve` and `advface bench` build the same flags from these fields
(``--compile/--no-compile`` ...), and each flag's default may come from ``ADVFACE_<FIELD>``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineSettings:
    """Speed-ups of the AdvFace engine; the defaults change no result and cost no start-up time (README).

    ``compile`` is off by default: each new batch size costs a compilation of tens of seconds on its
    first batch, which suits a deployment whose clients send a few fixed batch sizes, not every one.
    """

    compile: bool = _opt(False, "torch.compile the PGD step (one compilation, of tens of seconds, per batch size; "
                         "eager if it fails)")
    channels_last: bool = _opt(False, "run the shadow model on channels-last tensors")
    reuse_host_memory: bool = _opt(True, "keep freed host memory in the allocator, so large activations are not "
                                   "mapped and zeroed again at every PGD step (glibc only)")
    early_stop: bool = _opt(False, "stop a face once its state repeats or its shadow loss stops rising; changes "
                            "results (within the README's stated privacy-gain tolerance)")
    patience: int = _opt(4, "early stop: steps without a rise of the shadow loss by --min-gain before a face stops")
    min_gain: float = _opt(0.01, "early stop: relative rise of a face's shadow loss that counts as progress")
    check_every: int = _opt(4, "early stop: steps between the host's checks that every face stopped (results do "
                            "not depend on it)")

    @classmethod
    def reference(cls) -> EngineSettings:
        """Today's plain eager loop, kept as the reference every speed-up is compared with."""
        return cls(compile=False, channels_last=False, reuse_host_memory=False, early_stop=False)

    @property
    def is_reference(self) -> bool:
        return not (self.compile or self.channels_last or self.reuse_host_memory or self.early_stop)

    def validate(self) -> EngineSettings:
        if self.patience < 1 or self.check_every < 1:
            raise ValueError(f"--patience and --check-every must be >= 1, got {self.patience} and {self.check_every}")
        if not self.min_gain >= 0:
            raise ValueError(f"--min-gain must be >= 0, got {self.min_gain}")
        return self


def _env_value(name: str, kind: type, default: Any) -> Any:
    raw = os.environ.get(f"ADVFACE_{name.upper()}")
    if raw is None:
        return default
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (``--no-X`` for booleans); the default is ``ADVFACE_<FIELD>`` if set, else the field's."""
    group = parser.add_argument_group("engine speed-ups")
    for f in fields(EngineSettings):
        kind = {"bool": bool, "int": int, "float": float}[str(f.type)]
        default = _env_value(f.name, kind, f.default)
        flag = f"--{f.name.replace('_', '-')}"
        help_text = f"{f.metadata['help']} [env ADVFACE_{f.name.upper()}; default: %(default)s]"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=default, help=help_text)


def engine_settings_from_args(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(**{f.name: getattr(args, f.name) for f in fields(EngineSettings)}).validate()
