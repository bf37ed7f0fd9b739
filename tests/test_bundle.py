"""Bundles: round trip, and a clear error for every kind of corruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plugin_service.bundle import (
    MANIFEST,
    SHADOW_FILE,
    BundleError,
    _content_hash,
    _sha256,
    load_bundle,
)
from tests.helpers import TINY_PGD, TINY_SHADOW, make_bundle


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "b")


def _rewrite_manifest(path: Path, edit) -> None:  # noqa: ANN001
    """Edits the manifest and re-signs it, as a careless tool would, so deeper checks are reached."""
    body = json.loads((path / MANIFEST).read_text())
    edit(body)
    body["files"] = {name: _sha256(path / name) for name in body["files"]}
    body["content_hash"] = _content_hash(body, body["files"])
    (path / MANIFEST).write_text(json.dumps(body))


def test_round_trip(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    assert b.manifest.shadow == TINY_SHADOW and b.manifest.pgd == TINY_PGD
    assert b.manifest.feature_shape == (64, 77, 77)
    assert len(b.version) == 12 and b.content_hash.startswith(b.version)
    assert load_bundle(bundle_dir).content_hash == b.content_hash
    assert not any(p.requires_grad for p in b.shadow.parameters())


def test_version_changes_with_the_weights(tmp_path: Path) -> None:
    a = load_bundle(make_bundle(tmp_path / "a", seed=0))
    b = load_bundle(make_bundle(tmp_path / "b", seed=1))
    assert a.content_hash != b.content_hash


def test_missing_file(bundle_dir: Path) -> None:
    (bundle_dir / SHADOW_FILE).unlink()
    with pytest.raises(BundleError, match=f"lacks {SHADOW_FILE}"):
        load_bundle(bundle_dir)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")


def test_hash_mismatch(bundle_dir: Path) -> None:
    data = bytearray((bundle_dir / SHADOW_FILE).read_bytes())
    data[-1] ^= 0xFF
    (bundle_dir / SHADOW_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the manifest"):
        load_bundle(bundle_dir)


def test_edited_manifest_breaks_the_content_hash(bundle_dir: Path) -> None:
    body = json.loads((bundle_dir / MANIFEST).read_text())
    body["pgd"]["eps"] = 0.01
    (bundle_dir / MANIFEST).write_text(json.dumps(body))
    with pytest.raises(BundleError, match="content hash mismatch"):
        load_bundle(bundle_dir)


def test_wrong_shape(bundle_dir: Path) -> None:
    state = {k: torch.zeros(v.shape) for k, v in load_bundle(bundle_dir).shadow.state_dict().items()}
    key = "stem.0.weight"
    state[key] = torch.zeros(5, 64, 3, 3)
    save_file(state, str(bundle_dir / SHADOW_FILE))
    _rewrite_manifest(bundle_dir, lambda body: None)
    with pytest.raises(BundleError, match=r"tensor stem.0.weight has shape \(5, 64, 3, 3\)"):
        load_bundle(bundle_dir)


def test_unknown_architecture(bundle_dir: Path) -> None:
    _rewrite_manifest(bundle_dir, lambda body: body["shadow"].update(arch="diffusion"))
    with pytest.raises(BundleError, match="unknown reconstruction architecture 'diffusion'"):
        load_bundle(bundle_dir)


def test_feature_shape_claim_is_checked(bundle_dir: Path) -> None:
    _rewrite_manifest(bundle_dir, lambda body: body.update(feature_shape=[64, 76, 76]))
    with pytest.raises(BundleError, match="feature_shape"):
        load_bundle(bundle_dir)


def test_missing_manifest_field(bundle_dir: Path) -> None:
    _rewrite_manifest(bundle_dir, lambda body: body.pop("split"))
    with pytest.raises(BundleError, match="lacks the field 'split'"):
        load_bundle(bundle_dir)


def test_pickle_file_is_refused(bundle_dir: Path) -> None:
    torch.save({"x": torch.zeros(1)}, bundle_dir / "shadow.pt")
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(bundle_dir)


def test_garbage_weights_file(bundle_dir: Path) -> None:
    (bundle_dir / SHADOW_FILE).write_bytes(b"not safetensors")
    _rewrite_manifest(bundle_dir, lambda body: None)
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(bundle_dir)


def test_default_bundle_loads() -> None:
    b = load_bundle(None)
    assert b.manifest.split == "conv2d_2b" and b.manifest.feature_shape == (64, 77, 77)


def test_copy_keeps_version(bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    assert load_bundle(copy).content_hash == load_bundle(bundle_dir).content_hash
