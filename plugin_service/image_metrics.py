"""Reconstruction quality, per image, for images in [0, 1]: SSIM and PSNR from torchmetrics, and MSE."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)


def ssim(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM with the standard 11x11 Gaussian window (sigma 1.5) over RGB."""
    return structural_similarity_index_measure(
        reconstruction.float().clamp(0, 1), original.float(), data_range=1.0, reduction="none")


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB with data range 1."""
    return peak_signal_noise_ratio(reconstruction.float().clamp(0, 1), original.float(), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3))


def mse(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """(N,) mean squared error over pixels and channels."""
    return (reconstruction.float().clamp(0, 1) - original.float()).pow(2).flatten(1).mean(dim=1)
