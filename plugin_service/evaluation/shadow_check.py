"""`advface shadow-check`: what a shadow model costs and buys, one row per bundle.

The numbers that choose a shadow's size: the identity lost by the shadow's round trip alone
(verification accuracy with E(S(z)) stored, AdvFace at eps 0), the privacy reached against the
shadow itself (its reconstruction SSIM/PSNR from unprotected and from AdvFace features, and
the loss gain the service exports), the accuracy with AdvFace at the bundle's settings, and
the CPU seconds per face that buys it. It trains nothing; `advface evaluate` trains attackers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from plugin_service.bundle import load_bundle
from plugin_service.evaluation.passes import make_protector, with_eps
from plugin_service.image_metrics import psnr, ssim
from plugin_service.models.recognizer import Recognizer
from plugin_service.models.shadow import count_parameters, flops_per_face
from plugin_service.pairs import load_eval_faces
from plugin_service.protect import ProtectorParams
from plugin_service.runtime import pick_device, progress
from plugin_service.verification import verify


@dataclass(frozen=True)
class ShadowCheck:
    bundle: str
    shadow: str
    parameters: int
    gflops: float
    faces: int
    clean_ssim: float
    clean_psnr: float
    protected_ssim: float
    protected_psnr: float
    loss_gain: float  # mean shadow-loss after / before, as the service's metric
    seconds_per_face: float  # AdvFace at the bundle's settings, this machine
    accuracy_clean: float | None = None
    accuracy_eps0: float | None = None  # E(S(z)) stored: the round trip alone
    accuracy_advface: float | None = None


def shadow_check(data: Path, pairs: Path, bundle_path: Path | None, recognizer: Recognizer | None,
                 pairs_per_fold: int | None, batch_size: int, device: str, seed: int = 0,
                 channels_last: bool = False) -> ShadowCheck:
    """One bundle's row, on the faces ``pairs`` names (every pair, or ``pairs_per_fold``)."""
    dev = pick_device(device)
    bundle = load_bundle(bundle_path).to(dev)
    faces = load_eval_faces(data, pairs, pairs_per_fold)
    order = torch.randperm(len(faces), generator=torch.Generator().manual_seed(seed))
    engine = make_protector("advface", bundle, ProtectorParams(), channels_last=channels_last)
    round_trip = make_protector("advface", bundle, with_eps(ProtectorParams(), "advface", 0.0))  # E(S(z)) alone
    n = len(faces)
    emb: dict[str, torch.Tensor] = {}
    sums = torch.zeros(5, dtype=torch.float64)
    seconds = 0.0
    for idx in progress(order.split(batch_size), desc="shadow check"):
        x = faces.images[idx].float().div(255).to(dev)
        with torch.no_grad():
            z = bundle.extractor(x)
        started = time.perf_counter()
        out = engine(z)
        seconds += time.perf_counter() - started
        with torch.no_grad():
            clean, protected = bundle.shadow(z), bundle.shadow(out.features)
            if recognizer is not None:
                for name, features in (("clean", z), ("eps0", round_trip(z).features), ("advface", out.features)):
                    e = recognizer.embed_features(features).float().cpu()
                    emb.setdefault(name, torch.zeros(n, e.shape[1]))[idx] = e
        assert out.shadow_loss_after is not None and out.shadow_loss_before is not None
        sums += torch.stack([ssim(clean, x).sum(), psnr(clean, x).sum(), ssim(protected, x).sum(),
                             psnr(protected, x).sum(), (out.shadow_loss_after / out.shadow_loss_before).sum()]).double().cpu()
    a, b, c, d, e = (float(v) / n for v in sums)
    spec = bundle.manifest.shadow
    shape = tuple(bundle.manifest.feature_shape)
    acc = {name: verify(v, emb["clean"], faces.pairs).accuracy for name, v in emb.items()}
    return ShadowCheck(str(bundle.path), f"{spec.arch} w{spec.width} d{spec.depth}", count_parameters(bundle.shadow),
                       flops_per_face(bundle.shadow, shape) / 1e9, n, a, b, c, d, e, seconds / n,
                       acc.get("clean"), acc.get("eps0"), acc.get("advface"))


def format_table(rows: list[ShadowCheck]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    head = (f"{'shadow':16s} {'params':>8s} {'GFLOP/face':>10s} {'s/face':>7s} {'acc clean':>9s} {'acc eps0':>9s} "
            f"{'acc advface':>11s} {'SSIM z':>7s} {'SSIM adv':>8s} {'gain':>6s}")
    lines = [head]
    for r in rows:
        lines.append(f"{r.shadow:16s} {r.parameters:8,d} {r.gflops:10.3f} {r.seconds_per_face:7.2f} "
                     f"{pct(r.accuracy_clean):>9s} {pct(r.accuracy_eps0):>9s} {pct(r.accuracy_advface):>11s} "
                     f"{r.clean_ssim:7.3f} {r.protected_ssim:8.3f} {r.loss_gain:6.2f}")
    return "\n".join(lines)
