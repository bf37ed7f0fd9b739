"""An independent, pretrained face recogniser: the identity judge of evaluation and the teacher of distillation.

Nobody in this project trained it, so its verdicts on reconstructions cannot be tuned by the
defence, and its embeddings give the recogniser something strong to learn from.
"""

from plugin_service.judge.cache import EmbeddingCache
from plugin_service.judge.dlib_resnet import (
    DLIB_THRESHOLD,
    DlibFaceRecognizer,
    JudgeNotInstalled,
    load_judge,
)

__all__ = ["DLIB_THRESHOLD", "DlibFaceRecognizer", "EmbeddingCache", "JudgeNotInstalled", "load_judge"]
