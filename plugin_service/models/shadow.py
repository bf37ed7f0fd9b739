"""Reconstruction networks: features (N, C, 77, 77) -> faces (N, 3, 160, 160) in [0, 1].

The same three architectures play two roles: the defender's shadow model S (inside the
engine) and the attacker's inversion network (in evaluation). The paper's names are kept:

* ``urec``     U-Net: encoder-decoder with skip connections at each scale.
* ``resrec``   ResNet decoder: residual blocks at feature resolution, then upsampling.
* ``transrec`` the layer-by-layer mirror of E (transposed convolutions), the weakest prior.

All normalisation goes through :class:`BatchNorm2d`, so one context manager,
:func:`batch_statistics`, switches every layer to the statistics of the incoming batch
without touching the stored running statistics.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from plugin_service.models.extractor import FACE_SIZE
from plugin_service.names import SHADOW_ARCHITECTURES

_BATCH_STATS: contextvars.ContextVar[bool] = contextvars.ContextVar("advface_batch_stats", default=False)


@contextlib.contextmanager
def batch_statistics() -> Iterator[None]:
    """Within this block every :class:`BatchNorm2d` normalises with the current batch's statistics.

    A context variable rather than ``module.train()`` keeps the shared model read-only: two
    threads or asyncio tasks can run the same network, one in each mode, and the running
    statistics are never updated.
    """
    token = _BATCH_STATS.set(True)
    try:
        yield
    finally:
        _BATCH_STATS.reset(token)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that uses batch statistics, without recording them, inside :func:`batch_statistics`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _BATCH_STATS.get():
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)


@dataclass(frozen=True)
class ShadowSpec:
    """Architecture and size of a reconstruction network; stored in every bundle manifest."""

    arch: str = "resrec"
    width: int = 16
    depth: int = 2
    in_channels: int = 64
    in_size: int = 77

    def __post_init__(self) -> None:
        if self.arch not in SHADOW_ARCHITECTURES:
            raise ValueError(f"unknown reconstruction architecture {self.arch!r}; choose one of {SHADOW_ARCHITECTURES}")
        if self.width < 2 or self.depth < 1:
            raise ValueError(f"width must be >= 2 and depth >= 1, got width={self.width} depth={self.depth}")


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class _ToImage(nn.Module):
    """Upsample to 160x160, refine at full resolution, squash to [0, 1]."""

    def __init__(self, width: int) -> None:
        super().__init__()
        half = max(width // 2, 2)
        self.refine = _cbr(width, half)
        self.out = nn.Conv2d(half, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(FACE_SIZE, FACE_SIZE), mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(self.refine(x)))


class ResRec(nn.Module):
    """ResNet decoder: ``depth`` residual blocks of ``width`` channels at feature resolution."""

    def __init__(self, spec: ShadowSpec) -> None:
        super().__init__()
        self.stem = _cbr(spec.in_channels, spec.width)
        self.blocks = nn.Sequential(*[_Residual(spec.width) for _ in range(spec.depth)])
        self.to_image = _ToImage(spec.width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.blocks(self.stem(z)))


class URec(nn.Module):
    """U-Net: ``depth`` down/up levels, channels doubling per level from ``width``."""

    def __init__(self, spec: ShadowSpec) -> None:
        super().__init__()
        w = spec.width
        self.stem = _cbr(spec.in_channels, w)
        self.down = nn.ModuleList(_cbr(w * 2**i, w * 2 ** (i + 1), stride=2) for i in range(spec.depth))
        self.up = nn.ModuleList(_cbr(w * 2 ** (i + 1) + w * 2**i, w * 2**i) for i in reversed(range(spec.depth)))
        self.to_image = _ToImage(w)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(z)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        return self.to_image(x)


class TransRec(nn.Module):
    """Mirror of E (conv2d_2b -> conv2d_2a -> conv2d_1a) with transposed convolutions.

    ``width`` scales E's 32 channels; ``depth`` adds extra mirrored layers at 77x77.
    Defined for the paper's split (64x77x77) only.
    """

    def __init__(self, spec: ShadowSpec) -> None:
        super().__init__()
        if spec.in_size != 77:
            raise ValueError(f"transrec mirrors E split at conv2d_2b (77x77 features), got {spec.in_size}x{spec.in_size}")
        w = spec.width
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(spec.in_channels, w, 3, padding=1, bias=False),  # mirrors conv2d_2b
            BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]
        for _ in range(spec.depth - 1):
            layers += [nn.ConvTranspose2d(w, w, 3, padding=1, bias=False), BatchNorm2d(w), nn.ReLU(inplace=True)]
        layers += [
            nn.ConvTranspose2d(w, w, 3, bias=False),  # mirrors conv2d_2a: 77 -> 79
            BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, 3, 3, stride=2, output_padding=1),  # mirrors conv2d_1a: 79 -> 160
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(z))


def build_shadow(spec: ShadowSpec) -> nn.Module:
    """The one place that maps an architecture name to a network."""
    return {"urec": URec, "resrec": ResRec, "transrec": TransRec}[spec.arch](spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_face(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs for one input of ``input_shape`` (without batch dim), counted by PyTorch."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(counter.get_total_flops())
