"""`advface bench` reports what it measured: the engine's effective settings and early stop's cost in privacy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from plugin_service.benchmark import bench_engine
from plugin_service.engine_settings import EngineSettings


def test_bench_compares_early_stop_with_every_step_under_the_same_best_state_rule(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("plugin_service.engine.native_bfloat16", lambda device: False)
    settings = EngineSettings(channels_last=True, bf16=True, early_stop=True, patience=1, check_every=1)
    bench_engine(None, "cpu", [2], 1, 4, settings, ["advface"], tmp_path / "bench.json")
    out = capsys.readouterr().out
    assert "bf16=False" in out and "early_stop=True" in out  # the settings the engine ran, not those asked for
    assert "early stop against all 4 steps keeping each face's best state" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["optimised_settings"]["bf16"] is False
    (result,) = report["results"]
    assert math.isfinite(result["gain_vs_full_best"]) and result["optimised"]["mean_steps"] <= 4


def test_bench_without_early_stop_does_not_claim_that_comparison(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bench_engine(None, "cpu", [2], 1, 2, EngineSettings(channels_last=True), ["advface"], None)
    out = capsys.readouterr().out
    assert "speed-up" in out and "keeping each face's best state" not in out
