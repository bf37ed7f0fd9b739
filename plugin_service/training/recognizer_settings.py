"""`advface train-recognizer`'s settings, without PyTorch: its flags are built from these fields (settings_cli).

One command runs two jobs: :class:`RecognizerTraining` classifies the folders' identities, and
:class:`DistillTraining` (chosen by ``--teacher``) distils a pretrained recogniser. The flags they
share are described once, on :class:`RecognizerTraining`, whose defaults are the command's;
distillation's own defaults apply when it is run from Python. The recogniser's architecture is
given as ``arch``/``split``/``embedding_dim``/``width`` and becomes a ``RecognizerSpec`` (in
:attr:`spec`, which loads torch) when training starts; the modules that train import these
classes from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from plugin_service.names import DEFAULT_SPLIT, RECOGNIZER_ARCHITECTURES, TEACHERS
from plugin_service.settings_cli import like, option

if TYPE_CHECKING:
    from plugin_service.models.recognizer import RecognizerSpec


class _Spec:
    """The ``RecognizerSpec`` of a settings class's ``arch``, ``split``, ``embedding_dim`` and ``width``."""

    arch: str
    split: str
    embedding_dim: int
    width: int

    @property
    def spec(self) -> RecognizerSpec:
        from plugin_service.models.recognizer import RecognizerSpec

        return RecognizerSpec(arch=self.arch, split=self.split, embedding_dim=self.embedding_dim, width=self.width)


@dataclass(frozen=True)
class RecognizerTraining(_Spec):
    data: tuple[Path, ...] = option(help="LFW-layout folder(s): NAME/NAME_NNNN.jpg, one folder per identity; "
                                    "never the evaluation sets (several need --teacher: labels are per folder)")
    out: Path = option(help="output weights (.safetensors)")
    arch: str = option("light", "light: E + small conv head (trainable on CPU); facenet: full InceptionResnetV1",
                       choices=RECOGNIZER_ARCHITECTURES)
    split: str = option(DEFAULT_SPLIT, "last layer of E (the default is the paper's)")
    width: int = option(32, "light head: channels of the first block")
    embedding_dim: int = option(128, "light head: embedding size")
    epochs: int = option(15, "training epochs")
    batch_size: int = option(64, "faces per training step")
    lr: float = option(1e-3, "peak learning rate")
    lr_decay: float = 0.94  # per epoch; this and the next two are no flags
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = option(0, "seed of the initialisation, the batch order and the augmentation")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    pairs: Path | None = option(None, "LFW pairs.txt to report verification accuracy on (every epoch when distilling)")
    pairs_root: Path | None = option(None, "folder the pairs' names refer to", default_help="next to --pairs")


@dataclass(frozen=True)
class DistillTraining(_Spec):
    """One distillation run; ``advface train-recognizer --help`` documents each field."""

    data: tuple[Path, ...] = like(RecognizerTraining, "data")
    out: Path = like(RecognizerTraining, "out")
    teacher: str = option("dlib", "distil from this pretrained recogniser (pip install 'advface-guard[eval]'); labels "
                          "are then optional", choices=TEACHERS, default_help="none: classify the folders' identities")
    arch: str = like(RecognizerTraining, "arch")
    split: str = like(RecognizerTraining, "split")
    width: int = like(RecognizerTraining, "width", 64)
    embedding_dim: int = like(RecognizerTraining, "embedding_dim")
    epochs: int = like(RecognizerTraining, "epochs", 12)
    batch_size: int = like(RecognizerTraining, "batch_size")
    lr: float = like(RecognizerTraining, "lr", 2e-3)
    weight_decay: float = 0.05  # this and warmup_steps are no flags
    warmup_steps: int = 200
    ce_weight: float = option(0.0, "distillation: weight of an identity cross-entropy term over the folders' labels")
    seed: int = like(RecognizerTraining, "seed")
    device: str = like(RecognizerTraining, "device")
    cache_dir: Path | None = option(None, "distillation: teacher embedding cache, keyed by pixels",
                                    default_help="~/.cache/advface/judge, shared with evaluation")
    limit_per_identity: int | None = option(None, "distillation: at most this many faces per identity")
    init: Path | None = option(None, "distillation: start from this recogniser's weights (same --arch, --width, "
                               "--embedding-dim), with a fresh warm-up and cosine schedule",
                               default_help="random initialisation")
    restarts: int = option(0, "distillation: after --epochs, this many warm restarts, each --restart-epochs long with "
                           "a fresh optimiser, warm-up and cosine schedule at --restart-lr: the same weights as "
                           "chaining runs with --init, in one command; each stage's weights are kept beside --out as "
                           "<name>-stageN.safetensors, and a rerun resumes at the first unfinished stage")
    restart_epochs: int = option(16, "distillation: epochs of each warm restart")
    restart_lr: float = option(1e-3, "distillation: peak learning rate of each warm restart")
    average_stages: int = option(1, "distillation with --restarts: --out is the mean of the last this many stages' "
                                 "weights (1: the last stage's own)")
    bn_faces: int = option(0, "distillation: at the end, measure every BatchNorm's statistics again on this many "
                           "un-augmented training faces (0: keep training's running averages)")
    pairs: Path | None = like(RecognizerTraining, "pairs")
    pairs_root: Path | None = like(RecognizerTraining, "pairs_root")
    report_pairs: tuple[Path, ...] = option((), "distillation: more pairs files scored once at the end "
                                            "(e.g. LFW's pairs.txt)")
    report_roots: tuple[Path, ...] = option((), "folders of --report-pairs", default_help="next to each")

    def validate(self) -> DistillTraining:
        """Refuses stage settings that cannot run, before the teacher or any face is loaded."""
        if self.restarts < 0 or (self.restarts and self.restart_epochs < 1):
            raise ValueError(f"--restarts must be >= 0 and --restart-epochs >= 1, got {self.restarts} and "
                             f"{self.restart_epochs}")
        if not 1 <= self.average_stages <= self.restarts + 1 or self.bn_faces < 0:
            raise ValueError(f"--average-stages must be between 1 and --restarts + 1 ({self.restarts + 1}) and "
                             f"--bn-faces >= 0, got {self.average_stages} and {self.bn_faces}")
        return self

    @property
    def stages(self) -> tuple[tuple[int, float, Path], ...]:
        """(epochs, peak lr, weights file) of the first run and of each warm restart.

        Without restarts the one stage writes --out; with them every stage writes its own file and
        --out is made from the last ``average_stages`` of them.
        """
        if not self.restarts:
            return ((self.epochs, self.lr, self.out),)
        return tuple((self.epochs if i == 0 else self.restart_epochs, self.lr if i == 0 else self.restart_lr,
                      self.out.with_name(f"{self.out.stem}-stage{i + 1}{self.out.suffix}"))
                     for i in range(self.restarts + 1))

    @property
    def monitor(self) -> tuple[Path, Path] | None:
        """(pairs file, root) whose accuracy is logged after every epoch."""
        return None if self.pairs is None else (self.pairs, self.pairs_root or self.pairs.parent)

    @property
    def report(self) -> tuple[tuple[Path, Path], ...]:
        """(pairs file, root) scored at the end: --pairs, then each --report-pairs."""
        roots = self.report_roots or tuple(p.parent for p in self.report_pairs)
        return (*([self.monitor] if self.monitor else []), *zip(self.report_pairs, roots))
