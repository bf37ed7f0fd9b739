"""Privacy numbers of one attacker on one protector: reconstruction quality and replay success.

Higher PSNR/SSIM, lower MSE and higher SRRA mean the attacker recovered more of the face, i.e.
less privacy. Means and standard deviations are over faces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from plugin_service.evaluation.pipeline import AttackOutputs
from plugin_service.evaluation.replay import ReplayResult


@dataclass(frozen=True)
class PrivacySummary:
    psnr: float
    psnr_std: float
    ssim: float
    ssim_std: float
    mse: float
    mse_std: float
    srra: float
    srra_other: float
    faces: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(attack: AttackOutputs, replay: ReplayResult) -> PrivacySummary:
    def stats(values: np.ndarray) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values))

    return PrivacySummary(*stats(attack.psnr), *stats(attack.ssim), *stats(attack.mse), replay.srra,
                          replay.srra_other, len(attack.psnr))
