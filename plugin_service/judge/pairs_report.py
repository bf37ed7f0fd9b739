"""The judge's own verification numbers on a pairs file: the bar a distilled recogniser is measured against.

Scored with the same 10-fold code and TAR@FAR as every recogniser of the project, on dlib's
negative Euclidean distance, plus dlib's fixed rule (distance < 0.6) over all pairs, so the
student's and the teacher's numbers in MODELS.md come from one command each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plugin_service.judge.cache import EmbeddingCache
from plugin_service.judge.dlib_resnet import DLIB_THRESHOLD, DlibFaceRecognizer
from plugin_service.pairs import load_eval_faces
from plugin_service.verification import kfold_accuracy


def judge_pairs_report(judge: DlibFaceRecognizer, cache: EmbeddingCache, root: Path, pairs: Path,
                       per_fold: int | None = None) -> dict[str, float]:
    """10-fold accuracy, fold spread, TAR@FAR and fixed-rule accuracy of ``judge`` on an LFW-format pairs file."""
    faces = load_eval_faces(root, pairs, per_fold)
    emb = cache.embed(faces.images, judge.embed, desc=f"judge: {Path(pairs).name}")
    index = faces.pairs
    distance = (emb[index.left] - emb[index.right]).norm(dim=1).numpy()
    r = kfold_accuracy(-distance, index.same, index.folds)
    fixed = float(((distance < DLIB_THRESHOLD) == index.same).mean())
    return {"pairs": len(index.same), "accuracy": r.accuracy, "std": r.std, f"accuracy@{DLIB_THRESHOLD:g}": fixed,
            **{f"tar@far={k}": v for k, v in r.tar_at_far.items()}}


def format_report(report: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) and not np.isnan(v) else f"{k} {v}" for k, v in report.items())
