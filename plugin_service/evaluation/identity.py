"""Identity scores of reconstructions, by the independent judge: does the attacker get the person back?

* same-image match: the judge says the reconstruction and the original photo show the same person
  (dlib's own rule, Euclidean distance < 0.6).
* rank-1: the reconstruction's nearest neighbour in a gallery of one OTHER photo of every
  evaluation identity is the right person; chance is 1 / gallery size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plugin_service.judge.dlib_resnet import DLIB_THRESHOLD


@dataclass(frozen=True)
class Gallery:
    """One other photo's judge embedding per identity, and which probes have one."""

    embeddings: torch.Tensor  # (G, D)
    identities: list[str]  # (G,)

    @property
    def chance(self) -> float:
        return 1.0 / max(len(self.identities), 1)


def same_image_rate(reconstructed: torch.Tensor, original: torch.Tensor, threshold: float = DLIB_THRESHOLD) -> float:
    """Fraction of faces whose reconstruction the judge matches to its own original photo."""
    if len(original) == 0:
        return float("nan")
    return float(((reconstructed.float() - original.float()).norm(dim=1) < threshold).float().mean())


def rank1(queries: torch.Tensor, names: list[str], gallery: Gallery, metric: str = "euclidean") -> float:
    """Fraction of queries (those whose identity the gallery holds) whose nearest gallery entry is theirs."""
    index = {n: i for i, n in enumerate(gallery.identities)}
    rows = [i for i, n in enumerate(names) if n in index]
    if not rows:
        return float("nan")
    q = queries[rows].float()
    g = gallery.embeddings.float()
    if metric == "cosine":
        score = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    else:
        score = -torch.cdist(q, g)
    best = score.argmax(dim=1)
    truth = torch.tensor([index[names[i]] for i in rows])
    return float((best == truth).float().mean())
