"""`advface shadow-check` on the tiny bundle and the sample faces."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from plugin_service.bundle import sample_faces_path
from plugin_service.cli import main
from plugin_service.evaluation.shadow_check import shadow_check


def _pairs(tmp_path: Path) -> Path:
    """Two folds of two matched and two mismatched pairs over the sample faces."""
    people = sorted(p.name for p in sample_faces_path().iterdir() if p.is_dir())
    lines = ["2 2"]
    for fold in range(2):
        a, b, c, d = people[4 * fold : 4 * fold + 4]
        lines += [f"{a} 1 2", f"{b} 1 2", f"{a} 1 {c} 1", f"{b} 2 {d} 1"]
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("channels_last", [False, True])
def test_shadow_check_measures_both_sides(tiny_bundle: Path, tmp_path: Path, channels_last: bool) -> None:
    r = shadow_check(sample_faces_path(), _pairs(tmp_path), tiny_bundle, None, None, batch_size=4, device="cpu",
                     channels_last=channels_last)
    assert r.faces == 12
    assert all(math.isfinite(v) for v in (r.clean_ssim, r.clean_psnr, r.protected_ssim, r.protected_psnr))
    assert r.loss_gain > 1.0  # PGD ascends the shadow loss
    assert r.seconds_per_face > 0 and r.accuracy_eps0 is None


def test_shadow_check_command_prints_one_row_per_bundle(tiny_bundle: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main(["shadow-check", "--data", str(sample_faces_path()), "--pairs", str(_pairs(tmp_path)),
                 "--bundle", str(tiny_bundle), str(tiny_bundle), "--batch-size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["shadow", "params"] and len(out) == 4
    assert out[2].split()[0] == "resrec" and "%" in out[2]
