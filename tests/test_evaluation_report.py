"""End to end on tiny synthetic data: `evaluate` writes report files holding the numbers it computed."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin_service.evaluation.caches import ModelCache
from plugin_service.evaluation.config import EvaluationConfig
from plugin_service.evaluation.report import FIGURES, REPORT, RESULTS, _clean, fmt
from plugin_service.evaluation.runner import run_evaluation, utility_views
from plugin_service.faces import split_identities
from plugin_service.image_metrics import psnr
from plugin_service.models.recognizer import load_recognizer
from plugin_service.models.shadow import ShadowSpec
from plugin_service.pairs import load_eval_faces
from plugin_service.verification import cosine_similarity, kfold_accuracy
from tests.synthetic_data import (
    write_bundle,
    write_face_folder,
    write_pairs,
    write_recognizer,
)


HEAD_COLUMNS = ("recognizer", "finetuned", "finetuned stored side")


def test_the_stored_side_head_column_pairs_the_fine_tuned_head_with_original_probes() -> None:
    assert utility_views(["recognizer"]) == {"recognizer": ("recognizer", "recognizer")}
    assert utility_views(["recognizer", "finetuned"]) == {
        "recognizer": ("recognizer", "recognizer"), "finetuned": ("finetuned", "finetuned"),
        "finetuned stored side": ("finetuned", "recognizer")}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EvaluationConfig, dict]]:
    patch = pytest.MonkeyPatch()
    patch.setenv("ADVFACE_NO_PROGRESS", "1")
    root = tmp_path_factory.mktemp("e2e")
    public = write_face_folder(root / "public", 8, 3, seed=1, prefix="pub")
    dev = write_face_folder(root / "dev", 4, 3, seed=2, prefix="dev")
    write_pairs(root / "pairs.txt", dev, 3)
    extractor = write_bundle(root / "bundle", spec=ShadowSpec("resrec", 4, 1), shadow_identities=split_identities(public)[0])
    write_recognizer(root / "rec.safetensors", extractor)
    write_recognizer(root / "tuned.safetensors", extractor, seed=7)  # stands in for a fine-tuned head
    cfg = EvaluationConfig.create(
        quick=True, data=root / "dev", pairs=root / "pairs.txt", attack_data=root / "public", out=root / "report",
        bundle=root / "bundle", recognizer=root / "rec.safetensors", finetuned_recognizer=root / "tuned.safetensors",
        attackers=("transrec",), adaptive_attacker="transrec", transfer_shadows=("resrec", "transrec"),
        eps=(0.0, 0.2), dp_epsilons=(2.0,), pgd_steps=1, examples=2, cache_dir=root / "cache", device="cpu")
    yield cfg, run_evaluation(cfg)
    patch.undo()


@pytest.mark.slow
def test_report_files_exist_and_results_json_is_what_the_run_returned(run: tuple[EvaluationConfig, dict]) -> None:
    cfg, results = run
    for name in (REPORT, RESULTS, *FIGURES.values()):
        assert (cfg.out / name).is_file(), name
    for name in FIGURES.values():
        assert (cfg.out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((cfg.out / RESULTS).read_text())
    assert on_disk == json.loads(json.dumps(_clean(results)))
    assert on_disk["figures"] == {**FIGURES, **{f"tier_{t}": f"tier_{t}.png" for t in ("A0", "A1", "A2")}}


@pytest.mark.slow
def test_every_tier_runs_against_every_protector_and_the_floor(run: tuple[EvaluationConfig, dict]) -> None:
    _, results = run
    tiers = results["tiers"]
    protectors = [*results["main"], "embedding-only"]
    for name in protectors:
        seen = {row["tier"] for row in tiers["rows"] if row["protector"] == name}
        assert seen == {"A0", "A1", "A2"}, (name, seen)
        assert 0.0 <= tiers["linkage_rank1"][name] <= 1.0
        assert tiers["linkage_rank1"][name] == max(tiers["linkage_by_map"][name].values())
    guesses = [row for row in tiers["rows"] if row["protector"] == "nothing stored"]
    assert [row["tier"] for row in guesses] == ["A0", "A1", "A2"]
    assert tiers["linkage_rank1"]["nothing stored"] == tiers["chance_rank1"]
    assert {"embedding-only or nothing", "nothing stored"} <= set(tiers["summary"])
    for row in tiers["rows"]:
        assert -1.0 <= row["ssim"] <= 1.0 and 0.0 <= row["dlib_same"] <= 1.0 and 0.0 <= row["srra"] <= 1.0
    assert 0 < tiers["chance_rank1"] <= 1.0


@pytest.mark.slow
def test_the_report_shows_every_main_number(run: tuple[EvaluationConfig, dict]) -> None:
    cfg, results = run
    report = (cfg.out / REPORT).read_text()
    assert fmt(results["threshold"], "threshold") in report
    assert list(results["clean"]) == list(HEAD_COLUMNS)
    for head in HEAD_COLUMNS:
        assert fmt(results["clean"][head]["accuracy"], "accuracy") in report
    assert set(results["main"]) == {"none", "random", "dp", "advface"}
    for name, record in results["main"].items():
        assert set(record["privacy"]) == {"transrec", "transrec+adaptive"}
        for head in HEAD_COLUMNS:
            cell = f"{fmt(record['utility'][head]['accuracy'], 'accuracy')} ± {fmt(record['utility'][head]['std'], 'std')}"
            assert cell in report, (name, head)
        for summary in record["privacy"].values():
            assert f"{fmt(summary['psnr'], 'psnr')} ± {fmt(summary['psnr_std'], 'psnr')}" in report
            assert f"{fmt(summary['ssim'], 'ssim')} ± {fmt(summary['ssim_std'], 'ssim')}" in report
            assert fmt(summary["srra"], "srra") in report
    for point in results["tradeoff"]:
        row = (f"| {point['protector']} | {point['knob']} | {fmt(point['value'], '')} | {fmt(point['accuracy'], 'accuracy')} "
               f"| {point['worst_attacker']} | {fmt(point['psnr'], 'psnr')} |")
        assert row in report
    t = results["transfer"]
    for i, shadow in enumerate(t["shadows"]):
        row = f"| {shadow} ({t['shadow_labels'][i]}) | {fmt(t['psnr'][i][0], 'psnr')} | {fmt(t['accuracy'][i], 'accuracy')} |"
        assert row in report


@pytest.mark.slow
def test_the_numbers_match_an_independent_recomputation(run: tuple[EvaluationConfig, dict]) -> None:
    cfg, results = run
    faces = load_eval_faces(cfg.data, cfg.pairs)
    assert results["data"]["eval_faces"] == len(faces) and results["data"]["pairs"] == 20
    x = faces.images.float() / 255
    recognizer = load_recognizer(cfg.recognizer).eval()
    with torch.no_grad():
        emb = recognizer(x)
    scores = cosine_similarity(emb[faces.pairs.left], emb[faces.pairs.right])
    clean = kfold_accuracy(scores, faces.pairs.same, faces.pairs.folds)
    assert results["clean"]["recognizer"]["accuracy"] == pytest.approx(clean.accuracy)
    assert results["threshold"] == pytest.approx(clean.threshold, abs=1e-5)
    # With no protection, the stored feature is E(x): utility equals clean verification.
    assert results["main"]["none"]["utility"]["recognizer"]["accuracy"] == pytest.approx(clean.accuracy)
    # The attacker, reloaded from the cache, reconstructs E(x) to the reported PSNR.
    key = next(k for k in (p.stem for p in cfg.cache_dir.glob("*.safetensors"))  # type: ignore[union-attr]
               if k.startswith(results["networks"]["attackers"]["transrec"]["cache_key"]))
    spec = ShadowSpec("transrec", cfg.attacker_width, cfg.attacker_depth)  # type: ignore[arg-type]
    attacker, _ = ModelCache(cfg.cache_dir).load(key, spec)  # type: ignore[misc]
    with torch.no_grad():
        expected = psnr(attacker(recognizer.extractor(x)), x).mean().item()
    assert results["main"]["none"]["privacy"]["transrec"]["psnr"] == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
def test_sweep_transfer_and_attackers_are_consistent(run: tuple[EvaluationConfig, dict]) -> None:
    cfg, results = run
    points = results["tradeoff"]
    assert [(p["protector"], p["value"]) for p in points] == [
        ("random", 0.0), ("random", 0.2), ("dp", 2.0), ("advface", 0.0), ("advface", 0.2)]
    # The sweep point at the main table's setting is the main table's pass.
    main = results["main"]["advface"]
    at_main = next(p for p in points if p["protector"] == "advface" and p["value"] == main["params"]["eps"])
    assert at_main["psnr"] == main["privacy"]["transrec"]["psnr"]
    assert at_main["accuracy"] == main["utility"]["recognizer"]["accuracy"]
    # Random noise with eps 0 stores E(x) unchanged.
    random0 = next(p for p in points if p["protector"] == "random" and p["value"] == 0.0)
    assert random0["psnr"] == pytest.approx(results["main"]["none"]["privacy"]["transrec"]["psnr"])
    assert main["perturbation_norm"] == pytest.approx(main["params"]["eps"], abs=1e-6)
    t = results["transfer"]
    assert t["shadows"] == ["resrec", "transrec"] and t["shadow_labels"] == ["bundle", "defender-transrec"]
    assert t["psnr"][0][0] == main["privacy"]["transrec"]["psnr"]  # the bundle's row is the main pass
    nets = results["networks"]
    assert nets["transfer_shadows"]["resrec"] == "bundle"
    assert nets["transfer_shadows"]["transrec"]["role"] == "shadow"
    assert nets["adaptive"]["attacker"]["label"] == "transrec+adaptive"
    assert nets["adaptive"]["shadow"]["arch"] == "resrec"  # the attacker copies the defence's architecture
    assert nets["attackers"]["transrec"]["width"] != results["bundle"]["shadow"]["width"]
    defender, attacker = split_identities([f"pub_{i:03d}" for i in range(8)])
    assert results["disjointness"] == {"shadow_identities": len(defender), "attacker_identities": len(attacker),
                                       "overlap": 0, "verified": True}
    assert np.isfinite(results["main"]["advface"]["shadow_loss_after"])


@pytest.mark.slow
def test_a_rerun_resumes_every_finished_pass_and_reports_the_same_numbers(
        run: tuple[EvaluationConfig, dict], caplog: pytest.LogCaptureFixture) -> None:
    cfg, results = run
    caplog.set_level(logging.INFO, logger="plugin_service.evaluation.runner")
    again = run_evaluation(replace(cfg, out=cfg.out.parent / "report-again"))
    passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pass: ")]
    resumed = [m for m in passes if m.endswith("(resumed from the cache)")]
    # Every pass with the bundle's shadow (main table and sweep) resumes; only transfer shadows' passes recompute.
    assert len(resumed) >= len(results["main"]) + 3  # the sweep's eps 0 (random, advface) and dp 2
    assert all(m in resumed or "shadow=defender-" in m for m in passes), passes
    strip = lambda main: {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in main.items()}  # noqa: E731
    assert strip(again["main"]) == strip(results["main"])
    assert again["tiers"]["rows"] == results["tiers"]["rows"]


def test_a_pass_keeps_the_stored_features_of_the_kept_faces_in_their_order(tmp_path: Path) -> None:
    from plugin_service.evaluation.passes import live, run_pass
    from plugin_service.models.extractor import Extractor
    from plugin_service.protect.baselines import Identity

    torch.manual_seed(0)
    images = (torch.rand(10, 3, 160, 160) * 255).to(torch.uint8)
    recognizer = write_recognizer(tmp_path / "r.safetensors", Extractor().eval())
    extractor = recognizer.extractor
    keep = torch.tensor([7, 2, 5])
    out = run_pass(images, torch.randperm(10), live(extractor, Identity()), {}, {"r": recognizer}, recognizer, 4,
                   torch.device("cpu"), torch.tensor([0]), keep=keep)
    with torch.no_grad():
        expected = extractor(images[keep].float() / 255).to(torch.float16)
    assert out.features is not None and torch.equal(out.features, expected)


def _keys_match(value: dict, schema: type, where: str) -> None:
    keys = set(value)
    assert schema.__required_keys__ <= keys, f"{where}: missing {schema.__required_keys__ - keys}"  # type: ignore[attr-defined]
    assert keys <= schema.__required_keys__ | schema.__optional_keys__, \
        f"{where}: undeclared {keys - schema.__required_keys__ - schema.__optional_keys__}"  # type: ignore[attr-defined]


@pytest.mark.slow
def test_results_json_has_exactly_the_declared_format(run: tuple[EvaluationConfig, dict]) -> None:
    from plugin_service.evaluation import results as fmt_

    cfg, _ = run
    on_disk = json.loads((cfg.out / RESULTS).read_text())
    _keys_match(on_disk, fmt_.Results, "results")
    for name, schema in (("meta", fmt_.Meta), ("bundle", fmt_.BundleInfo), ("data", fmt_.DataInfo),
                         ("tiers", fmt_.Tiers)):
        _keys_match(on_disk[name], schema, name)
    for name, record in on_disk["main"].items():
        _keys_match(record, fmt_.PassRecord, f"main.{name}")
        for attacker, privacy in record["privacy"].items():
            _keys_match(privacy, fmt_.Privacy, f"main.{name}.privacy.{attacker}")
        for head, verification in record["utility"].items():
            _keys_match(verification, fmt_.Verification, f"main.{name}.utility.{head}")
    for point in on_disk["tradeoff"]:
        _keys_match(point, fmt_.SweepPoint, "tradeoff")
    for row in on_disk["tiers"]["rows"]:
        _keys_match(row, fmt_.TierRow, "tiers.rows")
