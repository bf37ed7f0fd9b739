"""`advface bundle-add-recognizer`: put R, resynth's public start feature and the feature bound into a bundle.

The start feature is the mean of E over public faces: a fixed point that every stored resynth
feature departs from, so none ever starts from (or remembers) the client's z. The feature bound
(a generous multiple of the largest value E gave on those faces) lets the service reject absurd
inputs before they reach the engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from plugin_service.bundle import Bundle, BundleError, extractor_mismatch, load_bundle, save_bundle
from plugin_service.faces import load_face_folders
from plugin_service.models.recognizer import load_recognizer
from plugin_service.runtime import pick_device, progress

log = logging.getLogger(__name__)
BOUND_FACTOR = 4.0  # feature_bound = this x the largest value E gave on public faces


@torch.no_grad()
def feature_statistics(bundle: Bundle, faces: torch.Tensor, device: torch.device,
                       batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """(mean feature (C, H, W), largest value) of E over uint8 faces."""
    extractor = bundle.extractor.to(device)
    total, largest = None, 0.0
    for idx in progress(torch.arange(len(faces)).split(batch_size), desc="start feature"):
        z = extractor(faces[idx].float().div(255.0).to(device)).float()
        total = z.sum(0) if total is None else total + z.sum(0)
        largest = max(largest, float(z.max()))
    assert total is not None
    return (total / len(faces)).cpu(), largest


def add_recognizer(bundle_dir: Path, recognizer_path: Path, faces_roots: Sequence[Path], out: Path | None = None,
                   limit_per_identity: int | None = None, device: str = "auto") -> str:
    """Writes ``out`` (default: the bundle itself) with R, the start feature and the bound; returns its hash."""
    bundle = load_bundle(bundle_dir)
    recognizer = load_recognizer(recognizer_path)
    reason = extractor_mismatch(recognizer, bundle)
    if reason:
        raise BundleError(f"recogniser {recognizer_path} does not fit bundle {bundle_dir}: {reason}")
    faces = load_face_folders(faces_roots, limit_per_identity)
    start, largest = feature_statistics(bundle, faces.images, pick_device(device))
    provenance = {**bundle.manifest.provenance, "recognizer_source": Path(recognizer_path).name,
                  "start_feature": f"mean of E over {len(faces)} faces of {'+'.join(Path(r).name for r in faces_roots)}",
                  "feature_max_observed": f"{largest:.4f}"}
    manifest = replace(bundle.manifest, recognizer=recognizer.spec, feature_bound=round(BOUND_FACTOR * largest, 4),
                       provenance=provenance)
    content_hash = save_bundle(out or bundle_dir, manifest, bundle.extractor.cpu(), bundle.shadow.cpu(),
                               recognizer.cpu(), start)
    log.info("bundle %s: R %s, start feature from %d faces, feature bound %.3f", out or bundle_dir,
             json.dumps(manifest.recognizer.__dict__), len(faces), manifest.feature_bound)
    return content_hash
