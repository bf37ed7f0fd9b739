"""Embedding-bounded re-synthesis: store a feature that carries the identity embedding and nothing else."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.protect.base import Protection, Protector, lp_norm


class Resynth(Protector):
    r"""Re-synthesises each feature from its identity embedding alone.

    Whatever the backend stores must still give it the identity embedding e = R(z), so no
    stored feature can leak less than e does. AdvFace stores E(S(z)) + delta, which keeps much
    of the face: E is public and tiny, so optimising an image until E(image) matches the stored
    feature gives the face back. Resynth reaches the floor instead: it computes e = R(z), then
    optimises z' from a fixed public starting point (the mean feature of public faces, shipped in
    the bundle) with Adam until cos(R(z'), e) >= ``target_cosine`` or ``max_steps`` run out, and
    stores z'. z enters only through e, so z' is a function of e (and of public constants): any
    attack on z' is an attack on e. The data-processing inequality does the rest.

    R runs in eval mode (running BatchNorm statistics), so a face's result never depends on its
    batch-mates, and the optimisation is deterministic for given weights and inputs. z' is kept
    non-negative, like every output of E (which ends in a ReLU), so stored features stay in range.

    Arguments:
        head (nn.Module): R, frozen; features (N, C, H, W) -> embeddings (N, D).
        start (torch.Tensor): (C, H, W) public starting feature; never derived from z.
        target_cosine (float): stop a face once cos(R(z'), e) reaches it. (Default: 0.99)
        max_steps (int): Adam steps at most. (Default: 100)
        lr (float): Adam's step size on z'. (Default: 0.02)

    Shape:
        - z: (N, C, H, W), (N, 64, 77, 77) for the paper's split; any float dtype.
        - output: :class:`Protection` with ``features`` of z's shape, dtype and device, and per
          face the ``cosine`` reached and the ``steps`` taken.

    Examples::
        >>> recognizer, start = bundle.require_recognizer("resynth")
        >>> stored = Resynth(recognizer.head, start)(z).features
    """

    name = "resynth"

    def __init__(self, head: nn.Module, start: torch.Tensor, target_cosine: float = 0.99, max_steps: int = 100,
                 lr: float = 0.02) -> None:
        if not -1.0 < target_cosine <= 1.0 or max_steps < 0 or lr <= 0:
            raise ValueError(f"need -1 < target_cosine <= 1, max_steps >= 0 and lr > 0 "
                             f"(got {target_cosine}, {max_steps}, {lr})")
        self.head, self.start = head, start
        self.target_cosine, self.max_steps, self.lr = target_cosine, max_steps, lr

    def params(self) -> dict[str, Any]:
        return {"target_cosine": self.target_cosine, "max_steps": self.max_steps, "lr": self.lr}

    def __call__(self, z: torch.Tensor) -> Protection:
        with torch.no_grad():
            embedding = self.head(z.float())
        features, cosine, steps = self.synthesize(embedding)
        return Protection(features.to(z.dtype), lp_norm(features - z.float(), "linf"), cosine=cosine, steps=steps)

    def synthesize(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z' (N, C, H, W), cosine reached (N,), steps taken (N,)) for embeddings (N, D).

        This is the only place a stored feature is made, and it sees the embedding, not z.
        """
        target = F.normalize(embedding.detach().float(), dim=1)
        n = target.shape[0]
        start = self.start.to(target.device, torch.float32)
        current = start.expand(n, *start.shape).clone().requires_grad_(True)
        result = current.detach().clone()
        best = torch.full((n,), -2.0, device=target.device)
        steps = torch.zeros(n, dtype=torch.long, device=target.device)
        done = torch.zeros(n, dtype=torch.bool, device=target.device)
        optimizer = torch.optim.Adam([current], lr=self.lr)
        with torch.enable_grad():
            for step in range(self.max_steps + 1):
                # One forward per step scores the state the previous step made and gives the next gradient.
                cos = F.cosine_similarity(self.head(current), target, dim=1)
                with torch.no_grad():
                    better = ~done & (cos > best)
                    result[better] = current[better]
                    best = torch.where(better, cos, best)
                    steps = torch.where(better, torch.full_like(steps, step), steps)
                    done = done | (best >= self.target_cosine)
                if step == self.max_steps or bool(done.all()):
                    break
                optimizer.zero_grad(set_to_none=True)
                (1.0 - cos).sum().backward()  # faces are independent: R in eval, Adam per element
                optimizer.step()
                with torch.no_grad():
                    current.clamp_(min=0.0)
        return result, best.detach(), steps
