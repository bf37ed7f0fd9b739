"""`advface shadow-check` on the tiny bundle and the sample faces."""

from __future__ import annotations

import math
from pathlib import Path

from plugin_service.bundle import sample_faces_path
from plugin_service.cli import main
from plugin_service.evaluation.shadow_check import shadow_check


def test_shadow_check_measures_both_sides(tiny_bundle: Path) -> None:
    r = shadow_check(sample_faces_path(), tiny_bundle, limit=6, batch_size=3, device="cpu")
    assert r.faces == 6
    assert all(math.isfinite(v) for v in (r.clean_ssim, r.clean_psnr, r.protected_ssim, r.protected_psnr))
    assert r.loss_gain > 1.0  # PGD ascends the shadow loss


def test_shadow_check_command_prints_the_table(tiny_bundle: Path, capsys) -> None:  # noqa: ANN001
    assert main(["shadow-check", "--data", str(sample_faces_path()), "--bundle", str(tiny_bundle),
                 "--limit", "4", "--batch-size", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "unprotected (z)" in out and "adversarial (AdvFace)" in out and "on 4 faces" in out
