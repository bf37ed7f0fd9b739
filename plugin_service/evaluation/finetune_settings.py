"""`advface finetune-head`'s settings, without PyTorch: its flags are built from these fields (settings_cli).

Kept apart from :mod:`.finetune`, which imports torch, so `advface --help` builds the parser fast.
The protector settings are described once, on :class:`EvaluationConfig`, whose flags they share;
they become a :class:`ProtectorParams` in :attr:`HeadFinetuning.params`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plugin_service.evaluation.config import EvaluationConfig
from plugin_service.names import IDENTITY_HALVES, PROTECTORS
from plugin_service.protector_params import ProtectorParams
from plugin_service.settings_cli import like, option

TARGETS = ("clean", "teacher", "identity")  # what R(protected) learns; see finetune.py


@dataclass(frozen=True)
class HeadFinetuning:
    data: tuple[Path, ...] = option(help="LFW-layout public face folder(s); never the evaluation sets")
    out: Path = option(help="output recogniser (.safetensors)")
    recognizer: Path | None = option(None, "recogniser .safetensors to start from", default_help="the embedded one")
    bundle: Path | None = option(None, "bundle whose protector makes the features", default_help="the embedded one")
    protector: str = option("advface", "protector whose features R learns to read",
                            choices=tuple(p for p in PROTECTORS if p != "none"))
    target: str = option("clean", "what R(protected) learns: the clean R's embedding (XNN-d), dlib's, or identity CE",
                         choices=TARGETS)
    eps: float | None = like(EvaluationConfig, "protector_eps", group=None)
    pgd_steps: int | None = like(EvaluationConfig, "pgd_steps", group=None)
    pgd_alpha: float | None = like(EvaluationConfig, "pgd_alpha", group=None)
    dp_epsilon: float | None = like(EvaluationConfig, "dp_epsilon", group=None)
    dp_bound: float | None = like(EvaluationConfig, "dp_bound", group=None)
    epochs: int = option(3, "training epochs")
    batch_size: int = option(32, "faces per protector call and per training step")
    channels_last: bool = like(EvaluationConfig, "channels_last", group=None)
    lr: float = option(1e-4, "Adam learning rate")
    weight_decay: float = 5e-4  # this and label_smoothing are no flags
    label_smoothing: float = 0.1
    clean_mix: bool = option(True, "train on protected features only")
    freeze_batch_norm: bool = option(False, "keep the head's BatchNorm statistics (measured on clean faces) fixed "
                                     "and train the rest, so the mixed batches of protected and clean features do "
                                     "not replace them")
    half: str = option("all", "train on one identity half of --data", choices=IDENTITY_HALVES)
    limit_per_identity: int | None = option(None, "read at most this many faces per identity")
    seed: int = option(0, "seed of the initialisation, the batch order and the protectors' noise")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    resume: bool = option(True, "recompute the protected features instead of loading those an earlier run with the "
                          "same bundle, protector, faces and seed left in the cache")
    cache_dir: Path | None = option(None, "cache of protected features (under passes/, beside the trained attackers)",
                                    default_help="$ADVFACE_CACHE_DIR or ~/.cache/advface/attackers")

    @property
    def params(self) -> ProtectorParams:
        """The protector's settings; unset ones keep the bundle's (PGD) or the registry's (DP) defaults."""
        dp = {k: v for k, v in (("dp_epsilon", self.dp_epsilon), ("dp_bound", self.dp_bound)) if v is not None}
        return ProtectorParams(steps=self.pgd_steps, alpha=self.pgd_alpha, eps=self.eps, **dp)
