"""`advface shadow-check`: does the engine defeat its own shadow model on these faces?

The quick sanity number for a bundle: the shadow model's reconstructions from unprotected
features against those from the engine's adversarial features (SSIM, PSNR), plus the
recogniser's clean verification accuracy. Unlike `advface evaluate` it trains nothing; the
attackers a thief would train are the subject of that command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from plugin_service.bundle import load_bundle
from plugin_service.faces import load_face_folder
from plugin_service.image_metrics import psnr, ssim
from plugin_service.protect import build_protector
from plugin_service.runtime import pick_device, progress


@dataclass(frozen=True)
class ShadowCheck:
    faces: int
    clean_ssim: float
    clean_psnr: float
    protected_ssim: float
    protected_psnr: float
    loss_gain: float  # mean shadow-loss after / before, as the service's metric


def shadow_check(data: Path, bundle_path: Path | None, limit: int, batch_size: int, device: str,
                 seed: int = 0) -> ShadowCheck:
    dev = pick_device(device)
    bundle = load_bundle(bundle_path).to(dev)
    faces = load_face_folder(data)
    order = torch.randperm(len(faces), generator=torch.Generator().manual_seed(seed))[:limit]
    engine = build_protector("advface", bundle)
    sums = torch.zeros(5, dtype=torch.float64)
    for start in progress(range(0, len(order), batch_size), total=-(-len(order) // batch_size), desc="shadow check"):
        x = faces.floats(order[start : start + batch_size]).to(dev)
        with torch.no_grad():
            z = bundle.extractor(x)
        out = engine(z)
        with torch.no_grad():
            clean, protected = bundle.shadow(z), bundle.shadow(out.features)
        assert out.shadow_loss_after is not None and out.shadow_loss_before is not None
        sums += torch.stack([ssim(clean, x).sum(), psnr(clean, x).sum(), ssim(protected, x).sum(),
                             psnr(protected, x).sum(), (out.shadow_loss_after / out.shadow_loss_before).sum()]).double().cpu()
    n = len(order)
    a, b, c, d, e = (float(v) / n for v in sums)
    return ShadowCheck(n, a, b, c, d, e)
