"""The strongest attack of each tier, per protector, and the floor composed with resynth.

Read per tier, a protector is as weak as the best attack on it, so the summary keeps, for each
metric separately, the maximum over that tier's attacks. The *composed* floor adds one fact the
direct attacks on e miss: anyone holding e also holds R and resynth's public start (they ship with
the backend), so it can compute synthesize(e) itself, which equals resynth's stored feature byte
for byte (tests/test_resynth.py), and run every attack on it. The best attack on e is therefore at
least as strong as the best attack on resynth's storage; where the direct floor attacks score lower
than those on resynth, the direct attacks on e were the weaker ones, not resynth the leakier.
"""

from __future__ import annotations

from typing import Any

FLOOR = "embedding-only"
COMPOSED = "embedding-only, composed"
METRICS = ("ssim", "dlib_same", "dlib_rank1")
TIERS = ("A0", "A1", "A2")


def _best(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and v == v]  # drop None and NaN
    return max(kept) if kept else None


def summarize_tiers(rows: list[dict[str, Any]], linkage: dict[str, float]) -> dict[str, dict[str, Any]]:
    """{protector: {tier: {metric: best over the tier's attacks}, "A3": linkage rank-1}}, plus the composed floor."""
    summary: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["protector"] for r in rows):
        summary[name] = {tier: {m: _best([r[m] for r in rows if r["protector"] == name and r["tier"] == tier])
                                for m in METRICS} for tier in TIERS}
        summary[name]["A3"] = linkage.get(name)
    if FLOOR in summary and "resynth" in summary:
        floor, resynth = summary[FLOOR], summary["resynth"]
        summary[COMPOSED] = {tier: {m: _best([floor[tier][m], resynth[tier][m]]) for m in METRICS} for tier in TIERS}
        summary[COMPOSED]["A3"] = _best([floor["A3"], resynth["A3"]])
    return summary


def margins(summary: dict[str, dict[str, Any]], protector: str, floor: str) -> dict[str, dict[str, float | None]]:
    """Per tier, how far ``protector``'s best attack is above ``floor``'s: SSIM and rank-1 (points of rate)."""
    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    out = {tier: {"ssim": diff(summary[protector][tier]["ssim"], summary[floor][tier]["ssim"]),
                  "dlib_rank1": diff(summary[protector][tier]["dlib_rank1"], summary[floor][tier]["dlib_rank1"])}
           for tier in TIERS}
    out["A3"] = {"linkage_rank1": diff(summary[protector]["A3"], summary[floor]["A3"])}
    return out
