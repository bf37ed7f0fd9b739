"""The resynth protector: what it stores is a function of R(z) alone, reaches its cosine, and needs R."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plugin_service.bundle import BundleError, load_bundle, save_bundle
from plugin_service.models.extractor import freeze
from plugin_service.models.recognizer import LightHead, Recognizer, RecognizerSpec
from plugin_service.protect import ProtectorParams, build_protector
from plugin_service.protect.resynth import Resynth


class CornerHead(nn.Module):
    """A recogniser that reads only pixel (0, 0) of each channel: many features share one embedding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, 8)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(z[:, :, 0, 0]), dim=1)


def _head(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    head = LightHead(4, 4, 16)
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        head.blocks[0][1].running_mean.uniform_(0, 0.5)
    return freeze(head)


def test_output_depends_on_z_only_through_its_embedding() -> None:
    torch.manual_seed(0)
    head = freeze(CornerHead(4))
    start = torch.rand(4, 9, 9)
    z = torch.rand(3, 4, 9, 9)
    other = torch.rand(3, 4, 9, 9) * 5
    other[:, :, 0, 0] = z[:, :, 0, 0]  # same embedding, everything else different
    assert not torch.equal(z, other) and torch.equal(head(z), head(other))
    protector = Resynth(head, start, target_cosine=0.999, max_steps=30, lr=0.05)
    a, b = protector(z), protector(other)
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.steps, b.steps)
    # and it is exactly the synthesis from the embedding: z enters nowhere else
    features, _, _ = protector.synthesize(head(z))
    assert torch.equal(a.features, features)


def test_reaches_the_target_cosine_and_reports_it() -> None:
    head = _head()
    start = torch.rand(4, 21, 21)
    z = torch.rand(5, 4, 21, 21) * 2
    out = Resynth(head, start, target_cosine=0.95, max_steps=200, lr=0.05)(z)
    cos = F.cosine_similarity(head(out.features), head(z), dim=1)
    assert torch.allclose(cos, out.cosine, atol=1e-5)
    assert bool((out.cosine >= 0.95).all()), out.cosine
    assert bool((out.steps > 0).all()) and bool((out.steps <= 200).all())
    assert bool((out.features >= 0).all()), "stored features stay non-negative, like E's outputs"
    assert out.features.shape == z.shape and out.features.dtype == z.dtype


def test_a_face_does_not_depend_on_its_batch_mates() -> None:
    head = _head(1)
    start = torch.rand(4, 21, 21)
    z = torch.rand(4, 4, 21, 21)
    protector = Resynth(head, start, target_cosine=0.98, max_steps=40, lr=0.05)
    together = protector(z).features
    alone = torch.cat([protector(z[i : i + 1]).features for i in range(len(z))])
    assert torch.allclose(together, alone, atol=1e-4)


def test_deterministic() -> None:
    head = _head(2)
    start = torch.rand(4, 21, 21)
    z = torch.rand(2, 4, 21, 21)
    protector = Resynth(head, start, max_steps=20)
    assert torch.equal(protector(z).features, protector(z).features)


def test_bundle_without_r_refuses_resynth_with_the_fix(tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="bundle-add-recognizer"):
        build_protector("resynth", load_bundle(tiny_bundle))


def test_bundle_carries_r_and_the_start_feature(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    recognizer = Recognizer(RecognizerSpec(width=4, embedding_dim=16))
    recognizer.extractor.load_facenet_state(bundle.extractor.facenet_state())
    start = torch.rand(bundle.manifest.feature_shape)
    manifest = replace(bundle.manifest, recognizer=recognizer.spec, feature_bound=40.0)
    save_bundle(tmp_path / "b", manifest, bundle.extractor, bundle.shadow, recognizer, start)
    loaded = load_bundle(tmp_path / "b")
    assert loaded.recognizer is not None and loaded.start is not None
    assert torch.equal(loaded.start, start) and loaded.manifest.feature_bound == 40.0
    assert loaded.recognizer.extractor is loaded.extractor
    z = loaded.extractor(torch.rand(2, 3, 160, 160))
    out = build_protector("resynth", loaded, ProtectorParams(steps=3))(z)
    assert out.features.shape == z.shape and bool((out.steps <= 3).all())
    # the recogniser file is hashed like every other weight file
    (tmp_path / "b" / "recognizer.safetensors").write_bytes(b"not weights")
    with pytest.raises(BundleError, match="recognizer.safetensors"):
        load_bundle(tmp_path / "b")


def test_engine_serves_resynth_with_its_per_face_numbers(tiny_bundle: Path, tmp_path: Path) -> None:
    from plugin_service.engine import Engine

    bundle = load_bundle(tiny_bundle)
    recognizer = Recognizer(RecognizerSpec(width=4, embedding_dim=16))
    recognizer.extractor.load_facenet_state(bundle.extractor.facenet_state())
    manifest = replace(bundle.manifest, recognizer=recognizer.spec)
    save_bundle(tmp_path / "r", manifest, bundle.extractor, bundle.shadow, freeze(recognizer),
                torch.rand(bundle.manifest.feature_shape))
    engine = Engine(load_bundle(tmp_path / "r"), "cpu")
    z = engine.bundle.extractor(torch.rand(2, 3, 160, 160)).numpy()
    out = engine.protect(z, "resynth", ProtectorParams(steps=5))
    assert out.features.shape == z.shape and out.features.dtype == z.dtype
    assert ((out.cosine > -1) & (out.cosine <= 1)).all() and ((out.steps >= 0) & (out.steps <= 5)).all()
    advface = engine.protect(z, "advface")
    assert (advface.cosine != advface.cosine).all()  # NaN: not resynth's numbers
