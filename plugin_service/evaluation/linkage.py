"""Tier A3 (b): the linkage attack. A student maps stored values to the independent judge's embedding.

Transform-based defences can hide the face and still give the identity away: an attacker with
public faces, the defence's code and the judge trains a network from (protected feature of a
face) to (judge embedding of that face), then links every stolen record to a gallery by nearest
neighbour (FaceLinkGen, 2026). Against the embedding-only control the student reads e = R(z).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.models.recognizer import LightHead
from plugin_service.runtime import minibatches, progress, seed_everything


class EmbeddingStudent(nn.Module):
    """Embeddings (N, D_in) -> judge space (N, D_out): a two-layer MLP."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, d_out))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(e), dim=1)


def build_student(stored_shape: tuple[int, ...], d_out: int, width: int = 32) -> nn.Module:
    """A conv student for feature maps (C, H, W), an MLP for embedding vectors (D,)."""
    if len(stored_shape) == 1:
        return EmbeddingStudent(stored_shape[0], d_out)
    return LightHead(stored_shape[0], width, d_out)


def train_linkage_student(stored: torch.Tensor, judge_embeddings: torch.Tensor, epochs: int, device: torch.device,
                          batch_size: int = 32, lr: float = 1e-3, seed: int = 0, desc: str = "linkage") -> nn.Module:
    """Fits a student from stored values (N, ...) to unit judge embeddings (N, D) by cosine loss."""
    generator = seed_everything(seed)
    student = build_student(tuple(stored.shape[1:]), judge_embeddings.shape[1]).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    target = F.normalize(judge_embeddings.float(), dim=1)
    for epoch in range(epochs):
        student.train()
        bar = progress(minibatches(len(stored), batch_size, generator, drop_last=True),
                       total=max(1, len(stored) // batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}")
        for idx in bar:
            out = student(stored[idx].float().to(device))
            loss = (1 - F.cosine_similarity(out, target[idx].to(device), dim=1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    student.eval()
    return student


@torch.no_grad()
def predict(student: nn.Module, stored: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """(N, D) predicted judge-space embeddings (unit vectors)."""
    return torch.cat([student(stored[i : i + batch_size].float().to(device)).cpu()
                      for i in range(0, len(stored), batch_size)])
