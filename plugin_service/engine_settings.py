"""How the engine computes: one typed object for every speed-up, with its flags and environment variables.

Each field switches one optimisation on or off, so `advface bench` can measure each against the
plain eager loop (:meth:`EngineSettings.reference`) and the tests can check that each gives the
reference's results. `advface serve` and `advface bench` build the same flags from these fields
(``--compile/--no-compile`` ...), and each flag's default may come from ``ADVFACE_<FIELD>``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from plugin_service import settings_cli
from plugin_service.config import ENV_PREFIX
from plugin_service.settings_cli import option


@dataclass(frozen=True)
class EngineSettings:
    """Speed-ups of the AdvFace engine; the defaults change no result and cost no start-up time (README).

    ``compile`` is off by default: each new batch size costs a compilation of tens of seconds on its
    first batch, which suits a deployment whose clients send a few fixed batch sizes, not every one.
    """

    compile: bool = option(False, "torch.compile the PGD step (one compilation, of tens of seconds, per batch size; "
                         "eager if it fails)")
    channels_last: bool = option(False, "run the shadow model on channels-last tensors")
    bf16: bool = option(False, "run the shadow's forward and backward under bfloat16 autocast (about 1.6x faster "
                      "on CPUs with AVX512-BF16/AMX; on CUDA unmeasured); changes results (within the README's "
                      "stated privacy-gain tolerance); ignored, with a warning, on a device without native "
                      "bfloat16 (an AVX2-only CPU ran it 8x slower)")
    reuse_host_memory: bool = option(True, "keep freed host memory in the allocator, so large activations are not "
                                   "mapped and zeroed again at every PGD step (glibc only)")
    early_stop: bool = option(False, "stop a face once its state repeats or its shadow loss stops rising; changes "
                            "results (within the README's stated privacy-gain tolerance)")
    keep_best: bool = option(False, "store, per face, the state with the highest shadow loss among those PGD scored "
                           "instead of the last one (the sign steps overshoot); raises the privacy gain, changes "
                           "results")
    patience: int = option(4, "early stop: steps without a rise of the shadow loss by --min-gain before a face stops")
    min_gain: float = option(0.01, "early stop: relative rise of a face's shadow loss that counts as progress")
    check_every: int = option(4, "early stop: steps between the host's checks that every face stopped (results do "
                            "not depend on it)")

    @classmethod
    def reference(cls) -> EngineSettings:
        """Today's plain eager loop, kept as the reference every speed-up is compared with."""
        return cls(compile=False, channels_last=False, bf16=False, reuse_host_memory=False, early_stop=False,
                   keep_best=False)

    @property
    def is_reference(self) -> bool:
        return not (self.compile or self.channels_last or self.bf16 or self.reuse_host_memory or self.early_stop
                    or self.keep_best)

    def validate(self) -> EngineSettings:
        if self.patience < 1 or self.check_every < 1:
            raise ValueError(f"--patience and --check-every must be >= 1, got {self.patience} and {self.check_every}")
        if not self.min_gain >= 0:
            raise ValueError(f"--min-gain must be >= 0, got {self.min_gain}")
        return self


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (``--no-X`` for booleans); the default is ``ADVFACE_<FIELD>`` if set, else the field's."""
    settings_cli.add_arguments(parser, EngineSettings, env_prefix=ENV_PREFIX, group="engine speed-ups")


def engine_settings_from_args(args: argparse.Namespace) -> EngineSettings:
    return settings_cli.from_args(args, EngineSettings).validate()
