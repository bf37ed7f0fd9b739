"""Threat-model checks (identity disjointness, same E), the attacker cache and protector helpers."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from plugin_service.bundle import load_bundle
from plugin_service.evaluation.attackers import (
    attacker_recipe,
    recipe_key,
    train_attackers,
)
from plugin_service.evaluation.caches import ModelCache, cache_key
from plugin_service.evaluation.cli_args import add_evaluate_parser
from plugin_service.evaluation.config import EvaluationConfig, EvaluationError
from plugin_service.evaluation.data import (
    DisjointnessError,
    batch_order,
    check_disjoint,
    fingerprint,
    load_attack_data,
    shadow_identities,
)
from plugin_service.evaluation.passes import make_protector, protect_dataset
from plugin_service.evaluation.runner import run_evaluation
from plugin_service.faces import split_identities
from plugin_service.models.extractor import Extractor
from plugin_service.models.shadow import ShadowSpec, build_shadow
from plugin_service.protect.pgd import AdvFace
from plugin_service.protect.registry import ProtectorParams
from tests.synthetic_data import (
    write_bundle,
    write_face_folder,
    write_pairs,
    write_recognizer,
)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVFACE_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Public faces (10 people x 3), dev faces with pairs, a bundle whose shadow saw only the defender half."""
    root = tmp_path_factory.mktemp("world")
    public = write_face_folder(root / "public", 10, 3, seed=1, prefix="pub")
    dev = write_face_folder(root / "dev", 4, 3, seed=2, prefix="dev")
    write_pairs(root / "pairs.txt", dev, 3)
    defender, attacker = split_identities(public)
    extractor = write_bundle(root / "bundle", shadow_identities=defender)
    write_bundle(root / "leaky", shadow_identities=public, extractor=extractor)  # saw everyone
    write_bundle(root / "unknown", shadow_identities=None, extractor=extractor)
    write_recognizer(root / "rec.safetensors", extractor)
    write_recognizer(root / "other.safetensors", Extractor(), seed=3)  # an unrelated E
    return {"root": root, "defender": defender, "attacker": attacker}  # type: ignore[dict-item]


def _cfg(world: dict, **kw: object) -> EvaluationConfig:
    root = world["root"]
    base = dict(data=root / "dev", pairs=root / "pairs.txt", attack_data=root / "public", out=root / "out",
                bundle=root / "bundle", recognizer=root / "rec.safetensors", cache_dir=root / "cache", device="cpu")
    base.update(kw)
    return EvaluationConfig.create(quick=True, **base)


def test_check_disjoint_accepts_disjoint_halves_and_names_the_overlap(world: dict) -> None:
    manifest = load_bundle(world["root"] / "bundle").manifest
    assert shadow_identities(manifest) == world["defender"]
    check = check_disjoint(manifest, world["attacker"])
    assert check.verified and check.overlap == 0 and check.shadow_identities == len(world["defender"])
    with pytest.raises(DisjointnessError, match=world["defender"][0]):
        check_disjoint(manifest, [world["defender"][0], *world["attacker"]])


def test_unknown_shadow_identities_are_refused_unless_allowed(world: dict) -> None:
    manifest = load_bundle(world["root"] / "unknown").manifest
    with pytest.raises(DisjointnessError, match="allow-unknown-shadow-data"):
        check_disjoint(manifest, world["attacker"])
    assert not check_disjoint(manifest, world["attacker"], allow_unknown=True).verified


def test_evaluate_refuses_a_bundle_whose_shadow_saw_the_attackers(world: dict) -> None:
    with pytest.raises(DisjointnessError, match="defender half"):
        run_evaluation(_cfg(world, bundle=world["root"] / "leaky"))
    assert not (world["root"] / "out").exists()  # refused before anything was trained or written


def test_cli_evaluate_reports_the_refusal_with_exit_code_2(world: dict, capsys: pytest.CaptureFixture[str]) -> None:
    root = world["root"]
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "--bundle", str(root / "leaky"), "--recognizer", str(root / "rec.safetensors"),
                              "--data", str(root / "dev"), "--pairs", str(root / "pairs.txt"), "--attack-data",
                              str(root / "public"), "--out", str(root / "cli-out"), "--quick", "--device", "cpu",
                              "--cache-dir", str(root / "cache")])
    assert args.func(args) == 2
    assert "shadow's training data" in capsys.readouterr().err


def test_evaluate_refuses_a_recognizer_with_another_extractor(world: dict) -> None:
    with pytest.raises(EvaluationError, match="differs from the bundle"):
        run_evaluation(_cfg(world, recognizer=world["root"] / "other.safetensors"))


def test_attacker_width_must_differ_from_the_shadow(world: dict) -> None:
    bundle = load_bundle(world["root"] / "bundle")
    assert attacker_recipe(_cfg(world), bundle, "urec").spec.width != bundle.manifest.shadow.width
    full = EvaluationConfig.create(data=Path("d"), pairs=Path("p"), attack_data=Path("a"), out=Path("o"))
    assert attacker_recipe(full, bundle, "urec").spec.width == 2 * bundle.manifest.shadow.width
    with pytest.raises(EvaluationError, match="attacker-width"):
        attacker_recipe(_cfg(world, attacker_width=bundle.manifest.shadow.width), bundle, "urec")


def test_cache_key_changes_with_every_recipe_field() -> None:
    base = {"role": "attacker", "bundle": "abc", "seed": 1, "identities": ["a", "b"], "adaptive": False}
    assert cache_key(base) == cache_key(dict(reversed(list(base.items()))))  # order-free
    for field, value in (("bundle", "abd"), ("seed", 2), ("identities", ["a"]), ("adaptive", True)):
        assert cache_key({**base, field: value}) != cache_key(base)


def test_cache_round_trip_and_corrupt_files(tmp_path: Path) -> None:
    spec = ShadowSpec("transrec", 4, 1)
    model = build_shadow(spec).eval()
    cache = ModelCache(tmp_path)
    assert cache.load("k", spec) is None
    cache.save("k", model, spec, {"val_psnr": "12.5"})
    loaded, meta = cache.load("k", spec)  # type: ignore[misc]
    assert meta["val_psnr"] == "12.5"
    z = torch.rand(2, 64, 77, 77)
    assert torch.equal(loaded(z), model(z))
    assert cache.load("k", ShadowSpec("transrec", 6, 1)) is None  # another architecture: not this file
    (tmp_path / "k.safetensors").write_bytes(b"not a safetensors file")
    assert cache.load("k", spec) is None
    assert ModelCache(None).load("k", spec) is None and ModelCache(None).save("k", model, spec, {}) is None


@pytest.mark.slow  # trains attackers
def test_attackers_train_on_the_attacker_half_and_are_cached(world: dict, tmp_path: Path) -> None:
    cfg = _cfg(world, attackers=("transrec",), cache_dir=tmp_path)
    bundle = load_bundle(cfg.bundle)
    attack = load_attack_data(cfg.attack_data)
    first = train_attackers(cfg, bundle, attack, ModelCache(tmp_path), torch.device("cpu"))["transrec"]
    assert not first.from_cache and first.train_identities == len(world["attacker"])
    assert first.train_faces == len(attack.attacker) - len(range(0, len(attack.attacker), 20))
    recipe = attacker_recipe(cfg, bundle, "transrec")
    assert first.cache_key == recipe_key("attacker", recipe, bundle, attack.attacker,
                                         fingerprint(attack.attacker))
    again = train_attackers(cfg, bundle, attack, ModelCache(tmp_path), torch.device("cpu"))["transrec"]
    assert again.from_cache and again.cache_key == first.cache_key
    z = torch.rand(2, 64, 77, 77)
    assert torch.equal(again.model(z), first.model(z))
    reseeded = train_attackers(_cfg(world, attackers=("transrec",), seed=5), bundle, attack, ModelCache(tmp_path),
                               torch.device("cpu"))["transrec"]
    assert not reseeded.from_cache and reseeded.cache_key != first.cache_key


def test_advface_with_eps_zero_skips_pgd_without_changing_the_result(world: dict) -> None:
    bundle = load_bundle(world["root"] / "bundle")
    z = bundle.extractor(torch.rand(4, 3, 160, 160, generator=torch.Generator().manual_seed(0)))
    fast = make_protector("advface", bundle, ProtectorParams(eps=0.0, steps=3))
    assert fast.params()["steps"] == 0
    slow = AdvFace(bundle.extractor, bundle.shadow, eps=0.0, alpha=0.2, steps=3)
    assert torch.allclose(fast(z).features, slow(z).features)
    other = build_shadow(ShadowSpec("transrec", 4, 1)).eval()
    assert make_protector("advface", bundle, ProtectorParams(), shadow=other).shadow is other  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        make_protector("random", bundle, ProtectorParams(), shadow=other)


def test_protect_dataset_batches_in_the_given_order(world: dict) -> None:
    bundle = load_bundle(world["root"] / "bundle")
    images = (torch.rand(5, 3, 160, 160, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    protector = make_protector("none", bundle, ProtectorParams())
    out = protect_dataset(images, bundle.extractor, protector, batch_order(5, 0), 2, torch.device("cpu"))
    assert out.dtype == torch.float16 and out.shape == (5, 64, 77, 77)
    expected = bundle.extractor(images.float() / 255)
    assert torch.allclose(out.float(), expected, atol=1e-2, rtol=1e-3)
