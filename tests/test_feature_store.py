"""`evaluate --keep-features`: a pass's stored features are kept once and replayed, never half-written."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin_service.evaluation.config import EvaluationConfig, EvaluationError
from plugin_service.evaluation.feature_store import FeatureStore
from plugin_service.evaluation.passes import live, run_pass
from plugin_service.evaluation.runner import FINETUNED, PRIMARY, run_evaluation
from plugin_service.models.extractor import Extractor
from plugin_service.models.shadow import ShadowSpec
from plugin_service.protect.base import Protection, Protector
from tests.synthetic_data import write_bundle, write_face_folder, write_pairs, write_recognizer


class Counting(Protector):
    """Adds noise (so stored != clean) and counts its calls."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, z: torch.Tensor) -> Protection:
        self.calls += 1
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(self.calls)) * 0.1
        return Protection(features=z + noise, perturbation_norm=noise.flatten(1).abs().amax(1),
                          shadow_loss_before=torch.ones(len(z)), shadow_loss_after=torch.full((len(z),), 2.0))

    def params(self) -> dict[str, float]:
        return {}


def _faces(n: int = 10) -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.rand(n, 3, 160, 160) * 255).to(torch.uint8)


def test_a_replayed_pass_scores_exactly_what_the_recorded_pass_scored_without_protecting(tmp_path: Path) -> None:
    images, order = _faces(), torch.randperm(10)
    recognizer = write_recognizer(tmp_path / "r.safetensors", Extractor().eval())
    protector, store = Counting(), FeatureStore(tmp_path / "features")
    source, finish = store.recording("k", len(images), live(recognizer.extractor, protector))
    first = run_pass(images, order, source, {}, {"r": recognizer}, recognizer, 4, torch.device("cpu"), torch.tensor([0]))
    finish()
    calls = protector.calls
    stored = store.load("k", len(images))
    assert stored is not None and stored.features.dtype == np.float16
    again = run_pass(images, order, stored.replay(), {}, {"r": recognizer}, recognizer, 4, torch.device("cpu"),
                     torch.tensor([0]))
    assert protector.calls == calls == 3  # ceil(10 / 4) batches, all in the first pass
    assert torch.equal(first.feature_embeddings["r"], again.feature_embeddings["r"])
    assert np.array_equal(first.perturbation_norm, again.perturbation_norm)
    assert first.shadow_loss_after is not None and again.shadow_loss_after is not None
    assert np.array_equal(first.shadow_loss_after, again.shadow_loss_after)


def test_an_unfinished_or_mismatched_recording_is_never_replayed(tmp_path: Path) -> None:
    images = _faces()
    extractor = Extractor().eval()
    store = FeatureStore(tmp_path / "features")
    source, finish = store.recording("k", len(images), live(extractor, Counting()))
    with torch.no_grad():
        source(torch.arange(4), images[:4].float() / 255)  # the run stops after one batch
    with pytest.raises(RuntimeError, match="before every face"):
        finish()
    assert store.load("k", len(images)) is None
    source, finish = store.recording("k", len(images), live(extractor, Counting()))
    with torch.no_grad():
        for idx in torch.arange(len(images)).split(4):
            source(idx, images[idx].float() / 255)
    finish()
    assert store.load("k", len(images)) is not None
    assert store.load("k", len(images) + 1) is None  # another face set under the same key: protect again


def test_keep_features_needs_the_cache() -> None:
    with pytest.raises(EvaluationError, match="--no-cache"):
        EvaluationConfig.create(quick=True, data=Path("d"), pairs=Path("p"), attack_data=Path("a"), out=Path("o"),
                                keep_features=True, use_cache=False)


@pytest.mark.slow
def test_a_second_evaluation_with_another_head_reads_the_kept_features(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVFACE_NO_PROGRESS", "1")
    write_face_folder(tmp_path / "public", 6, 2, seed=1, prefix="pub")
    dev = write_face_folder(tmp_path / "dev", 4, 3, seed=2, prefix="dev")
    write_pairs(tmp_path / "pairs.txt", dev, 3)
    extractor = write_bundle(tmp_path / "bundle", spec=ShadowSpec("resrec", 4, 1))
    write_recognizer(tmp_path / "rec.safetensors", extractor)
    for seed in (7, 8):
        write_recognizer(tmp_path / f"tuned{seed}.safetensors", extractor, seed=seed)
    cfg = EvaluationConfig.create(
        quick=True, data=tmp_path / "dev", pairs=tmp_path / "pairs.txt", attack_data=tmp_path / "public", out=tmp_path / "one",
        bundle=tmp_path / "bundle", recognizer=tmp_path / "rec.safetensors",
        finetuned_recognizer=tmp_path / "tuned7.safetensors", protectors=("advface", "random"), attackers=("resrec",),
        adaptive_attacker="none", transfer_shadows=(), eps=(0.2,), pgd_steps=2, examples=1, tiers=False,
        allow_unknown_shadow_data=True, keep_features=True, cache_dir=tmp_path / "cache", device="cpu")
    first = run_evaluation(cfg)
    caplog.set_level(logging.INFO, logger="plugin_service.evaluation.runner")
    second = run_evaluation(replace(cfg, out=tmp_path / "two", finetuned_recognizer=tmp_path / "tuned8.safetensors"))
    replayed = [r.getMessage() for r in caplog.records if "reads the features an earlier run stored" in r.getMessage()]
    assert len(replayed) == 3, replayed  # none, random, advface: no protector ran again
    for name in ("none", "random", "advface"):
        assert second["main"][name]["utility"][PRIMARY] == first["main"][name]["utility"][PRIMARY]
        assert second["main"][name]["perturbation_norm"] == first["main"][name]["perturbation_norm"]
    assert second["main"]["advface"]["utility"][FINETUNED] != first["main"]["advface"]["utility"][FINETUNED]
