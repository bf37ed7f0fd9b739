"""`advface shadow-check`'s settings, without PyTorch: its flags are built from these fields (settings_cli)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plugin_service.settings_cli import option


@dataclass(frozen=True)
class ShadowCheckSettings:
    data: Path = option(help="LFW-layout face folder the pairs refer to")
    pairs: Path = option(help="LFW-format pairs.txt over --data")
    bundle: tuple[Path, ...] = option((), "bundles to compare, one row each", default_help="the embedded one")
    recognizer: Path | None = option(None, "recogniser whose E the bundles share", default_help="the embedded one")
    pairs_per_fold: int | None = option(None, "only this many matched and mismatched pairs per fold",
                                        default_help="every pair")
    batch_size: int = option(16, "faces per AdvFace call (they share the shadow's batch statistics)")
    channels_last: bool = option(False, "run AdvFace's PGD on channels-last tensors, as `advface serve "
                                 "--channels-last` does: the same function up to floating-point reordering, faster "
                                 "on CPU")
    device: str = option("auto", "auto, cpu or cuda[:N]")
