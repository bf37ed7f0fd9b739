"""Per-face early stop for AdvFace's PGD, kept on the device so the loop never waits for the host.

With alpha = eps, L_inf and no random start, every element of delta stays in {-eps, 0, +eps}, so
PGD moves on a finite set of states and may revisit them. A face stops when

* its state repeats: the step would leave delta unchanged, or return it to the previous step's
  state (a 2-cycle), or
* its shadow loss has not risen by ``min_gain`` (relative) for ``patience`` steps.

On the default bundle the first never happened in our runs (about a third of the elements flip
at every step, period 1 or 2 alike) while the loss plateaus after about ten steps, so the plateau
is what stops faces in practice. The full 40-step run ends below the best state it visited, so
early stop ends with a higher mean privacy gain than the full run; against every step run with
the same best-state rule (``keep_best``) it ends within 0.4 % (README, Performance on CPU).

A stopped face keeps the state with the highest shadow loss it reached; the other faces go on.
The shadow normalises with the statistics of the whole batch, so a stopped face still takes part
in them (with its frozen delta) and changes the gradients of its batch-mates from then on, as
any change of a batch-mate does. The decision for each face is made at every step, on the
device; the host only checks every few steps whether all faces stopped, to leave the loop.
After the last face stopped no state changes, so results do not depend on how often it checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EarlyStop:
    """Stopping rule: ``patience`` steps without a relative loss rise of ``min_gain``, or a repeated state."""

    patience: int = 4
    min_gain: float = 0.01


class BestState:
    """Per face, the scored delta with the highest shadow loss so far (PGD's best iterate).

    With alpha = eps the sign steps overshoot, and the loss of the last state lies below the best
    one visited (README, Performance on CPU); keeping the best costs no extra pass, because every
    step scores its state anyway.
    """

    def __init__(self, delta: torch.Tensor) -> None:
        self.loss = torch.full((delta.shape[0],), -torch.inf, device=delta.device)
        self.delta = delta.clone()

    def update(self, loss: torch.Tensor, delta: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Records ``delta`` (whose loss is ``loss``) for each face, among ``active`` ones, where it beats the best."""
        better = loss > self.loss if active is None else active & (loss > self.loss)
        self.loss = torch.where(better, loss, self.loss)
        self.delta = torch.where(_faces(better), delta, self.delta)


class StopTracker:
    """The per-face state of the stopping rule for one batch; every tensor lives on the batch's device."""

    def __init__(self, rule: EarlyStop, delta: torch.Tensor) -> None:
        n = delta.shape[0]
        self.rule = rule
        self.active = torch.ones(n, dtype=torch.bool, device=delta.device)
        self.steps = torch.zeros(n, dtype=torch.long, device=delta.device)
        self.best = BestState(delta)
        self.reference = torch.full((n,), -torch.inf, device=delta.device)  # loss at the last counted rise
        self.stalled = torch.zeros(n, dtype=torch.long, device=delta.device)
        self.previous = delta.clone()

    def update(self, step: int, loss: torch.Tensor, delta: torch.Tensor, proposed: torch.Tensor) -> torch.Tensor:
        """Scores ``delta`` (its loss ``loss``) and returns the next delta: ``proposed``, or the best state of a stopped face."""
        active = self.active
        self.best.update(loss, delta, active)
        rose = active & (loss > self.reference * (1.0 + self.rule.min_gain))
        self.reference = torch.where(rose, loss, self.reference)
        self.stalled = torch.where(rose, torch.zeros_like(self.stalled), self.stalled + active.long())
        repeated = (proposed == delta).flatten(1).all(dim=1) | (proposed == self.previous).flatten(1).all(dim=1)
        self.steps = torch.where(active, torch.full_like(self.steps, step + 1), self.steps)
        self.active = active & ~(repeated | (self.stalled >= self.rule.patience))
        self.previous = delta
        return torch.where(_faces(self.active), proposed, self.best.delta)

    def all_stopped(self) -> bool:
        """The loop's only host synchronisation; call it every few steps."""
        return not bool(self.active.any())


def _faces(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)
