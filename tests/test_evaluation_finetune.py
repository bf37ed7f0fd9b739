"""Offline mode (`finetune-head`) and the two subcommands' argument parsing."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from plugin_service.evaluation.cli_args import (
    add_evaluate_parser,
    add_finetune_head_parser,
)
from plugin_service.evaluation.config import QUICK_DEFAULTS, EvaluationConfig, EvaluationError
from plugin_service.models.extractor import Extractor
from plugin_service.models.recognizer import load_recognizer
from tests.synthetic_data import write_bundle, write_face_folder, write_recognizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advface")
    sub = parser.add_subparsers(dest="command", required=True)
    add_evaluate_parser(sub)
    add_finetune_head_parser(sub)
    return parser


@pytest.mark.slow  # trains a head
def test_finetune_head_trains_the_head_and_keeps_e_frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ADVFACE_NO_PROGRESS", "1")
    write_face_folder(tmp_path / "public", 3, 4, seed=1)
    extractor = write_bundle(tmp_path / "bundle")
    before = write_recognizer(tmp_path / "rec.safetensors", extractor)
    argv = [
        "finetune-head", "--recognizer", str(tmp_path / "rec.safetensors"), "--bundle", str(tmp_path / "bundle"),
        "--data", str(tmp_path / "public"), "--pgd-steps", "1",
        "--epochs", "1", "--batch-size", "6", "--lr", "1e-2", "--device", "cpu", "--cache-dir", str(tmp_path / "c")]
    args = _parser().parse_args([*argv, "--out", str(tmp_path / "tuned.safetensors")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "12 faces of 3 identities" in out and "mean cosine to the target on protected features" in out
    # a second head on the same features reads them from the cache and trains to the same weights
    assert len(list((tmp_path / "c" / "passes").glob("*.safetensors"))) == 1

    def no_pgd(*_: object, **__: object) -> None:
        raise AssertionError("the cached features were computed again")

    monkeypatch.setattr("plugin_service.evaluation.finetune.protect_dataset", no_pgd)
    again = _parser().parse_args([*argv, "--out", str(tmp_path / "again.safetensors")])
    assert again.func(again) == 0
    twice = load_recognizer(tmp_path / "again.safetensors").flat_state()
    after = load_recognizer(tmp_path / "tuned.safetensors")
    old, new = before.flat_state(), after.flat_state()
    assert all(torch.equal(new[k], twice[k]) for k in new)
    for key in extractor.facenet_state():
        assert torch.equal(old[key], new[key]), key  # E is every client's: never touched
    changed = [k for k in old if k.startswith("head.") and k.endswith("weight") and not torch.equal(old[k], new[k])]
    assert changed, "the head did not train"
    with safe_open(str(tmp_path / "tuned.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["finetuned_from"] == "rec.safetensors" and meta["finetune_protector"] == "advface"
    assert '"steps": 1' in meta["finetune_params"]


@pytest.mark.slow  # trains a head
def test_finetune_head_by_identity_reports_identity_accuracy(tmp_path: Path) -> None:
    from plugin_service.evaluation.finetune import HeadFinetuning, finetune_head

    write_face_folder(tmp_path / "public", 3, 4, seed=2)
    extractor = write_bundle(tmp_path / "bundle")
    write_recognizer(tmp_path / "rec.safetensors", extractor)
    result = finetune_head(HeadFinetuning(data=(tmp_path / "public",), out=tmp_path / "id.safetensors",
                                          recognizer=tmp_path / "rec.safetensors", bundle=tmp_path / "bundle",
                                          target="identity", pgd_steps=1, epochs=1, batch_size=6, device="cpu",
                                          cache_dir=tmp_path / "c"))
    assert result.fit_name == "identity accuracy" and 0.0 <= result.fit <= 1.0
    assert abs(result.fit * 12 - round(result.fit * 12)) < 1e-9  # a count of the 12 protected faces


@pytest.mark.slow  # trains a head
@pytest.mark.parametrize("freeze_batch_norm", [False, True])
def test_finetune_head_keeps_batch_norm_statistics_only_when_asked(tmp_path: Path, freeze_batch_norm: bool) -> None:
    from plugin_service.evaluation.finetune import HeadFinetuning, finetune_head

    write_face_folder(tmp_path / "public", 3, 4, seed=3)
    extractor = write_bundle(tmp_path / "bundle")
    old = write_recognizer(tmp_path / "rec.safetensors", extractor).flat_state()
    finetune_head(HeadFinetuning(data=(tmp_path / "public",), out=tmp_path / "bn.safetensors",
                                 recognizer=tmp_path / "rec.safetensors", bundle=tmp_path / "bundle", pgd_steps=1,
                                 epochs=1, batch_size=6, lr=1e-2, device="cpu", cache_dir=tmp_path / "c",
                                 freeze_batch_norm=freeze_batch_norm))
    new = load_recognizer(tmp_path / "bn.safetensors").flat_state()
    statistics = [k for k in old if k.startswith("head.") and k.endswith(("running_mean", "running_var"))]
    weights = [k for k in old if k.startswith("head.") and k.endswith("weight")]
    assert statistics and weights
    assert any(not torch.equal(old[k], new[k]) for k in weights), "the head did not train"
    kept = [torch.equal(old[k], new[k]) for k in statistics]
    assert all(kept) if freeze_batch_norm else not any(kept)
    with safe_open(str(tmp_path / "bn.safetensors"), framework="pt") as f:
        assert f.metadata()["finetune_freeze_batch_norm"] == str(freeze_batch_norm)


def test_finetune_head_refuses_a_recognizer_with_another_e(tmp_path: Path) -> None:
    from plugin_service.evaluation.finetune import HeadFinetuning, finetune_head

    write_face_folder(tmp_path / "public", 2, 2)
    write_bundle(tmp_path / "bundle")
    write_recognizer(tmp_path / "rec.safetensors", Extractor())
    with pytest.raises(EvaluationError, match="differs from the bundle"):
        finetune_head(HeadFinetuning(recognizer=tmp_path / "rec.safetensors", data=tmp_path / "public",
                                     out=tmp_path / "x.safetensors", bundle=tmp_path / "bundle", device="cpu"))


def test_evaluate_arguments_overlay_the_quick_defaults() -> None:
    args = _parser().parse_args(["evaluate", "--data", "d", "--pairs", "p", "--attack-data", "a", "--out", "o",
                                 "--quick", "--attackers", "urec,transrec", "--eps", "0,0.1", "--attacker-width", "10",
                                 "--transfer-shadows", "none", "--adaptive-attacker", "none"])
    assert args.command == "evaluate" and callable(args.func)
    assert args.attackers == ("urec", "transrec") and args.eps == (0.0, 0.1) and args.transfer_shadows == ()
    cfg = EvaluationConfig.create(quick=True, attackers=args.attackers, eps=args.eps, attacker_width=args.attacker_width,
                                  transfer_shadows=args.transfer_shadows, adaptive_attacker=args.adaptive_attacker,
                                  data=args.data, pairs=args.pairs, attack_data=args.attack_data, out=args.out)
    assert cfg.attacker_width == 10  # explicit beats quick
    assert cfg.attacker_epochs == QUICK_DEFAULTS["attacker_epochs"] and cfg.pgd_steps == QUICK_DEFAULTS["pgd_steps"]
    assert cfg.adaptive_attacker is None and cfg.transfer_shadows == ()
    full = EvaluationConfig.create(data=Path("d"), pairs=Path("p"), attack_data=Path("a"), out=Path("o"))
    assert full.pgd_steps is None and full.attacker_epochs == 10 and full.adaptive_attacker == "urec"
    assert full.eps == (0.0, 0.05, 0.1, 0.2, 0.3) and full.protectors == ()  # (): all the bundle supports


def test_evaluate_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["evaluate", "--data", "d", "--pairs", "p", "--attack-data", "a", "--out", "o",
                              "--attackers", "urec,vgg"])
    with pytest.raises(EvaluationError, match="eps"):
        EvaluationConfig.create(data=Path("d"), pairs=Path("p"), attack_data=Path("a"), out=Path("o"), eps=(-0.1,))


def test_importing_the_subcommands_does_not_import_torch() -> None:
    code = "import sys, plugin_service.evaluation.cli_args; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
