"""The embedding-only control's decoder: identity embedding e (D,) -> face (3, 160, 160).

It is what the floor's attacker trains: the same L1 objective and data as the feature decoders,
from the only thing any recognisable storage must keep.
"""

from __future__ import annotations

import torch
from torch import nn

from plugin_service.models.extractor import FACE_SIZE


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EmbeddingDecoder(nn.Module):
    """A linear map to a 5x5 grid, then five x2 upsampling conv blocks to 160x160, sigmoid output."""

    def __init__(self, embedding_dim: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.base = 8 * w
        self.fc = nn.Linear(embedding_dim, self.base * 25)
        self.up = nn.Sequential(_up(8 * w, 8 * w), _up(8 * w, 4 * w), _up(4 * w, 2 * w), _up(2 * w, w), _up(w, w))
        self.out = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        x = self.fc(e.float()).view(-1, self.base, 5, 5)
        x = torch.sigmoid(self.out(self.up(x)))
        assert x.shape[-1] == FACE_SIZE
        return x
