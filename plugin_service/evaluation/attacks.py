"""Attacks that need no decoder from the defender's data: A2 inversion of E and the A3 linkage student.

Training-free attacks (tier A2 and the floor's): optimise an image until a known network maps it to the stored value.

E is public (every client device runs it) and three conv layers deep, and a feature holds about
five times more numbers than the face, so no decoder needs training: Adam on the pixels of a
sigmoid-parametrised image (so it stays in [0, 1]) with a small total-variation prior finds the
face. When only black-box access to E is assumed, the same runs through a surrogate E fitted on
(public image, E(image)) queries. The embedding-only control inverts R∘E onto e instead.

Tier A3 (b): the linkage attack. A student maps stored values to the independent judge's embedding.
Two students, and the attack is the better of them: a two-layer MLP trained by cosine loss, and a
linear map fitted in closed form (ridge least squares). On unprotected LFW features (R's
embeddings of 1,024 attacker faces, 1,539-identity gallery) the linear map linked 19.7 % rank-1
against 14.4 % for the MLP after 30 epochs and 11.0 % after 100 (it overfits 93 identities):
R is itself distilled from the judge, so the map is close to linear, and a closed form has no
epochs to get wrong.

Transform-based defences can hide the face and still give the identity away: an attacker with
public faces, the defence's code and the judge trains a network from (protected feature of a
face) to (judge embedding of that face), then links every stolen record to a gallery by nearest
neighbour (FaceLinkGen, 2026). Against the embedding-only control the student reads e = R(z).
Against stored feature maps it reads R(stored value): the attacker holds R (it ships with the
backend it stole from), and a student that must learn from raw 64x77x77 maps with a few hundred
public faces links nothing, not even unprotected features (0 % rank-1 in the 400-pair report),
which would flatter every protector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.models.extractor import FACE_SIZE, Extractor
from plugin_service.runtime import minibatches, progress, seed_everything

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, targets) -> per-face loss (N,)


@dataclass(frozen=True)
class InversionSettings:
    """Adam on sigmoid logits; ``tv_weight`` scales the total-variation prior."""

    steps: int = 200
    lr: float = 0.05
    tv_weight: float = 0.05
    batch_size: int = 32


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """(N,) mean absolute difference between neighbouring pixels: small for smooth, natural images."""
    dx = (images[..., 1:] - images[..., :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def feature_objective(extractor: nn.Module) -> Objective:
    """Per-face mean squared error between E(image) and the stored feature."""
    def loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(extractor(images), targets, reduction="none").flatten(1).mean(1)
    return loss


def embedding_objective(recognizer: nn.Module) -> Objective:
    """Per-face 1 - cos between R(E(image)) and the stored embedding (the floor's inversion)."""
    def loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(recognizer(images), targets, dim=1)
    return loss


def invert(objective: Objective, targets: torch.Tensor, settings: InversionSettings, device: torch.device,
           init: torch.Tensor | None = None, desc: str = "inversion") -> torch.Tensor:
    """(N, 3, 160, 160) images in [0, 1] minimising ``objective`` + TV, from grey or from ``init``.

    Faces are optimised in batches, independently (the objective is per face and the networks are
    in eval mode), so a face's result does not depend on its batch-mates.
    """
    out = torch.zeros(len(targets), 3, FACE_SIZE, FACE_SIZE)
    batches = list(torch.arange(len(targets)).split(settings.batch_size))
    for idx in progress(batches, desc=desc):
        t = targets[idx].float().to(device)
        start = torch.full((len(idx), 3, FACE_SIZE, FACE_SIZE), 0.5) if init is None else init[idx].float()
        logits = torch.logit(start.clamp(0.02, 0.98)).to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=settings.lr)
        with torch.enable_grad():
            for _ in range(settings.steps):
                images = torch.sigmoid(logits)
                loss = objective(images, t) + settings.tv_weight * total_variation(images)
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                optimizer.step()
        out[idx] = torch.sigmoid(logits.detach()).cpu()
    return out


def fit_surrogate_extractor(images: torch.Tensor, query: nn.Module, split: str, epochs: int, device: torch.device,
                            batch_size: int = 32, lr: float = 1e-3, seed: int = 0) -> Extractor:
    """A fresh E of the same architecture fitted by MSE to ``query``'s answers on uint8 public faces.

    This is the paper's black-box threat model made concrete: the attacker owns a client device,
    feeds it public faces and records what comes out.
    """
    generator = seed_everything(seed)
    surrogate = Extractor(split).to(device)
    optimizer = torch.optim.Adam(surrogate.parameters(), lr=lr)
    for epoch in range(epochs):
        surrogate.train()
        bar = progress(minibatches(len(images), batch_size, generator, drop_last=True),
                       total=max(1, len(images) // batch_size), desc=f"surrogate E epoch {epoch + 1}/{epochs}")
        for idx in bar:
            x = images[idx].float().div(255).to(device)
            with torch.no_grad():
                target = query(x)
            loss = F.mse_loss(surrogate(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(mse=f"{loss.item():.4f}")
    surrogate.eval()
    for p in surrogate.parameters():
        p.requires_grad_(False)
    return surrogate


class EmbeddingStudent(nn.Module):
    """Embeddings (N, D_in) -> judge space (N, D_out): a two-layer MLP."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, d_out))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(e), dim=1)


def train_linkage_student(inputs: torch.Tensor, judge_embeddings: torch.Tensor, epochs: int, device: torch.device,
                          batch_size: int = 32, lr: float = 1e-3, seed: int = 0, desc: str = "linkage") -> nn.Module:
    """Fits an MLP student from embeddings ``inputs`` (N, D_in) to unit judge embeddings (N, D) by cosine loss.

    For stored feature maps the inputs are R(stored value), computed once by the caller: the
    attacker holds R, and only the student learns.
    """
    generator = seed_everything(seed)
    student = EmbeddingStudent(inputs.shape[1], judge_embeddings.shape[1]).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    target = F.normalize(judge_embeddings.float(), dim=1)
    for epoch in range(epochs):
        student.train()
        bar = progress(minibatches(len(inputs), batch_size, generator, drop_last=True),
                       total=max(1, len(inputs) // batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}")
        for idx in bar:
            out = student(inputs[idx].float().to(device))
            loss = (1 - F.cosine_similarity(out, target[idx].to(device), dim=1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return student.eval()


class LinearLink(nn.Module):
    """Embeddings (N, D_in) -> unit judge-space vectors (N, D_out) through one affine map."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(e.flatten(1)), dim=1)


@torch.no_grad()
def fit_linear_link(inputs: torch.Tensor, judge_embeddings: torch.Tensor, ridge: float = 0.1) -> LinearLink:
    """The ridge least-squares affine map from ``inputs`` (N, D) to unit judge embeddings (N, D_out).

    Solved in float64 on the CPU; ``ridge`` is added to the diagonal of the (D + 1)-square normal
    matrix (the bias column included), which keeps it solvable with fewer faces than dimensions.
    """
    x = inputs.double().flatten(1).cpu()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = F.normalize(judge_embeddings.double().cpu(), dim=1)
    solution = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)  # (D + 1, D_out)
    return LinearLink(solution[:-1].T.float(), solution[-1].float()).eval()


@torch.no_grad()
def predict(student: nn.Module, stored: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """(N, D) ``student``'s outputs (judge-space unit vectors for a linkage student), in batches."""
    return torch.cat([student(stored[i : i + batch_size].float().to(device)).cpu()
                      for i in range(0, len(stored), batch_size)])
