"""`advface train-shadow`'s settings, without PyTorch: its flags are built from these fields (settings_cli).

Kept apart from :mod:`.shadow`, which imports torch, so `advface --help` builds the parser fast.
The shadow's architecture is given as ``arch``/``width``/``depth`` here and becomes a
``ShadowSpec`` (with E's feature shape) when training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plugin_service.names import DEFAULT_SPLIT, IDENTITY_HALVES, SHADOW_ARCHITECTURES
from plugin_service.settings_cli import option


@dataclass(frozen=True)
class ShadowTraining:
    data: tuple[Path, ...] = option(help="LFW-layout face folder(s) (public faces)")
    extractor: Path = option(help="weights for E: a recogniser .safetensors made by train-recognizer, or a FaceNet "
                             "state dict (e.g. 20180402-114759-vggface2.pt, read with weights_only=True)")
    out: Path = option(help="bundle directory to write")
    arch: str = option("resrec", "shadow architecture", choices=SHADOW_ARCHITECTURES)
    width: int = option(16, "channels of the network's main stage")
    depth: int = option(2, "residual blocks (resrec), levels (urec), extra layers (transrec)")
    half: str = option("all", "train on one identity half of --data, so attackers can train on the other",
                       choices=IDENTITY_HALVES)
    epochs: int = option(10, "training epochs")
    batch_size: int = option(32, "faces per training step")
    lr: float = option(1e-4, "Adam learning rate")
    seed: int = option(0, "seed of the initialisation and the batch order")
    identity_weight: float = option(0.0, "add this times 1 - cos(R(E(S(z))), R(z)) to the L1 loss (E and R from "
                                    "--extractor, a recogniser .safetensors), so that the round trip E(S(z)) that "
                                    "AdvFace stores keeps more of the identity")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    split: str = option(DEFAULT_SPLIT, "last layer of E (the default is the paper's)")
    with_recognizer: bool = option(False, "also put R from --extractor (a recogniser .safetensors) into the bundle, "
                                   "for resynth")
    command: str = ""  # the command line that made the bundle, recorded in its manifest (not a flag)
