"""The per-tier summary keeps each metric's strongest attack, and the composed floor is never below resynth."""

from __future__ import annotations

from plugin_service.evaluation.scoring import COMPOSED, FLOOR, FLOOR_OR_PRIOR, PRIOR, margins, summarize_tiers


def _row(protector: str, tier: str, attack: str, ssim: float, same: float, rank1: float | None) -> dict:
    return {"protector": protector, "tier": tier, "attack": attack, "ssim": ssim, "dlib_same": same, "dlib_rank1": rank1}


ROWS = [
    _row("resynth", "A0", "decoder", 0.40, 0.10, 0.05),
    _row("resynth", "A1", "fresh", 0.50, 0.05, 0.00),
    _row("resynth", "A1", "fine-tuned", 0.45, 0.20, 0.10),  # best same-image and rank-1, not best SSIM
    _row("resynth", "A2", "white-box", 0.30, 0.40, float("nan")),
    _row(FLOOR, "A0", "decoder on e", 0.35, 0.02, 0.00),
    _row(FLOOR, "A1", "decoder on e", 0.35, 0.02, 0.00),
    _row(FLOOR, "A2", "invert R∘E", 0.05, 0.00, 0.20),
]


def test_each_metric_keeps_its_own_best_attack_and_nan_is_ignored() -> None:
    s = summarize_tiers(ROWS, {"resynth": 0.07, FLOOR: 0.22})
    assert s["resynth"]["A1"] == {"ssim": 0.50, "dlib_same": 0.20, "dlib_rank1": 0.10}
    assert s["resynth"]["A2"]["dlib_rank1"] is None and s["resynth"]["A3"] == 0.07


def test_the_composed_floor_dominates_both_rows_and_resynth_never_exceeds_it() -> None:
    s = summarize_tiers(ROWS, {"resynth": 0.07, FLOOR: 0.22})
    for tier in ("A0", "A1", "A2"):
        for metric, value in s[COMPOSED][tier].items():
            for name in ("resynth", FLOOR):
                other = s[name][tier][metric]
                assert other is None or value >= other
    m = margins(s, "resynth", COMPOSED)
    assert all(v["ssim"] <= 0 for t, v in m.items() if t != "A3")
    assert margins(s, "resynth", FLOOR)["A1"]["ssim"] == 0.50 - 0.35


def test_the_floor_is_never_below_guessing_the_mean_face() -> None:
    guess = [_row(PRIOR, tier, "mean public face", 0.52, 0.01, 0.0) for tier in ("A0", "A1", "A2")]
    s = summarize_tiers(ROWS + guess, {"resynth": 0.07, FLOOR: 0.22, PRIOR: 0.001})
    assert s[FLOOR]["A2"]["ssim"] == 0.05 and s[FLOOR_OR_PRIOR]["A2"]["ssim"] == 0.52
    assert s[FLOOR_OR_PRIOR]["A2"]["dlib_rank1"] == 0.20 and s[FLOOR_OR_PRIOR]["A3"] == 0.22
    assert s[COMPOSED]["A1"]["ssim"] == 0.52  # the guess beats resynth's best A1 SSIM (0.50) too
    assert margins(s, "resynth", FLOOR_OR_PRIOR)["A1"]["ssim"] == 0.50 - 0.52


def test_no_composed_floor_without_resynth() -> None:
    rows = [r for r in ROWS if r["protector"] != "resynth"]
    assert COMPOSED not in summarize_tiers(rows, {FLOOR: 0.2})


def test_report_renders_the_summary_table() -> None:
    from plugin_service.evaluation.tiers import add_summary

    tiers = {"rows": ROWS, "linkage_rank1": {"resynth": 0.07, FLOOR: 0.22}}
    add_summary(tiers)
    assert set(tiers["resynth_margins"]) == {FLOOR, COMPOSED}
    from plugin_service.evaluation.report import _tier_summary

    # (the whole renderer, with figures, is exercised by test_evaluation_report)
    text = "\n".join(_tier_summary(tiers))
    assert "| embedding-only, composed |" in text and "resynth minus `embedding-only`: A0: SSIM +0.050" in text
