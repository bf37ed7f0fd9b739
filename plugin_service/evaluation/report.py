"""What an evaluation writes: results.json, report.md and the PNG figures.

REPORT_DIR: results.json (every number), report.md (every table) and the PNG figures.

report.md is rendered from the results dict alone, so every number a reader sees is in
results.json under the same name, and the report can be regenerated from the JSON.

The report's PNG figures, drawn with matplotlib's Agg backend (no display needed).

* :func:`reconstruction_grid`: original faces next to what the main attacker recovers from the
  unprotected and from each protected feature (paper Fig. 5).
* :func:`tradeoff_curve`: verification accuracy against the strongest attacker's PSNR and SSIM
  as the protection strength varies (paper Fig. 4).
* :func:`transfer_heatmap`: attacker PSNR/SSIM for every shadow x attacker architecture (paper Table 4).

Each takes plain numbers/tensors and a path, so the figures can be redrawn from results.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plugin_service.evaluation.results import Results

RESULTS = "results.json"
REPORT = "report.md"
FIGURES = {"reconstructions": "reconstructions.png", "tradeoff": "tradeoff.png", "transfer": "transfer.png"}
TIER_TITLES = {
    "A0": "A0: decoder trained on clean features (public faces, E)",
    "A1": "A1: the attacker knows the defence (decoder trained on its own protected features; A0 fine-tuned on them)",
    "A2": "A2: training-free inversion (optimise an image until E(image) matches the stored feature)",
    "A3": "A3: identity linkage (students from the stored value to the independent judge's embedding)",
}


def fmt(value: Any, kind: str) -> str:
    """How each kind of number is printed in report.md (tests use this to find the numbers)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if kind == "psnr":
        return f"{value:.2f}"
    if kind in ("ssim", "accuracy", "std", "threshold", "l1", "loss", "norm"):
        return f"{value:.4f}"
    if kind == "mse":
        return f"{value:.5f}"
    if kind in ("srra", "rate"):
        return f"{100 * value:.1f}%"
    if kind == "seconds":
        return f"{value:.0f} s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(row) + " |" for row in rows], ""]


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "—"


def _setup(r: dict[str, Any]) -> list[str]:
    b, d, dj, m = r["bundle"], r["data"], r["disjointness"], r["meta"]
    rec = "; ".join(f"{name}: `{info['path']}` ({info['arch']}, split {info['split']})"
                    for name, info in r["recognizers"].items())
    shadow = b["shadow"]
    check = (f"verified: the bundle shadow's {dj['shadow_identities']} identities and the attackers' "
             f"{dj['attacker_identities']} identities are disjoint" if dj["verified"]
             else "NOT verified: the bundle does not record its shadow identities (--allow-unknown-shadow-data)")
    return [
        "## Setup", "",
        f"- Bundle `{b['path']}` version `{b['version']}`: shadow {shadow['arch']} width {shadow['width']} depth "
        f"{shadow['depth']}, trained on {b['shadow_data'] or 'unrecorded data'}; bundle PGD defaults {_params(b['pgd'])}.",
        f"- Recognisers: {rec}.",
        f"- Verification set `{d['eval_root']}` with `{d['pairs_file']}`: {d['pairs']} pairs over {d['eval_faces']} faces "
        f"of {d['eval_identities']} identities.",
        f"- Attack data `{d['attack_root']}`: defender half {d['defender_faces']} faces / {d['defender_identities']} "
        f"identities, attacker half {d['attacker_faces']} faces / {d['attacker_identities']} identities; "
        f"{d['eval_attack_overlap']} verification identities also occur in the attack data.",
        f"- Identity disjointness: {check}.",
        f"- Replay threshold (best clean verification accuracy over all pairs): {fmt(r['threshold'], 'threshold')}.",
        f"- Device {m['device']}, torch {m['torch']}, seed {r['config']['seed']}, "
        f"{'QUICK smoke run (tiny models, not meaningful numbers)' if r['config']['quick'] else 'full run'}, "
        f"{fmt(m['seconds'], 'seconds')} in total; created {m['created']}.", "",
    ]


def _networks(r: dict[str, Any]) -> list[str]:
    nets = [*r["networks"]["attackers"].values()]
    if "adaptive" in r["networks"]:
        nets += [r["networks"]["adaptive"]["shadow"], r["networks"]["adaptive"]["attacker"]]
    nets += [t for t in r["networks"]["transfer_shadows"].values() if isinstance(t, dict)]
    rows = [[n["label"], n["role"], n["arch"], str(n["width"]), str(n["depth"]), str(n["epochs"]), str(n["seed"]),
             str(n["train_faces"]), str(n["train_identities"]), fmt(n["val_psnr"], "psnr"), fmt(n["val_ssim"], "ssim"),
             "yes" if n["from_cache"] else "no"] for n in nets]
    return ["## Reconstruction networks", "",
            "Attackers train on the attacker half only; defender shadows (transfer matrix) on the defender half; "
            "validation on every 20th face of their own half, from clean features (protected ones for the adaptive "
            "attacker).", "",
            *_table(["network", "role", "arch", "width", "depth", "epochs", "seed", "train faces", "identities",
                     "val PSNR", "val SSIM", "cached"], rows)]


def _utility(r: dict[str, Any]) -> list[str]:
    heads = list(r["clean"])
    header = ["protector", "parameters", *[f"accuracy ({h})" for h in heads], "mean perturbation", "shadow L1 before → after"]
    def acc(v: dict[str, Any]) -> str:
        return f"{fmt(v['accuracy'], 'accuracy')} ± {fmt(v['std'], 'std')}"

    rows = [["clean (no storage)", "—", *[acc(r["clean"][h]) for h in heads], "—", "—"]]
    for name, rec in r["main"].items():
        shadow = (f"{fmt(rec['shadow_loss_before'], 'l1')} → {fmt(rec['shadow_loss_after'], 'l1')}"
                  if "shadow_loss_before" in rec else "—")
        rows.append([name, _params(rec["params"]),
                     *[acc(rec["utility"][h]) for h in heads],
                     fmt(rec["perturbation_norm"], "norm"), shadow])
    notes = ["## Utility: verification accuracy", "",
             "10-fold LFW protocol on the pairs. The left face of each pair is enrolled: its feature is protected "
             "(batches of the configured size, identities mixed) and embedded by the server-side head; the right face "
             "is a clean probe embedded by the full recogniser."]
    if "finetuned" in heads:
        notes.append("The `finetuned` column uses the head from `advface finetune-head` (offline mode) on both sides, "
                     "the `recognizer` column the original head: before vs after fine-tuning. The `finetuned stored "
                     "side` column embeds the stored side with the fine-tuned head and the clean probe with the "
                     "original one, as a backend that keeps the head for its stored features only would.")
    return [*notes, "", *_table(header, rows)]


def _privacy(r: dict[str, Any]) -> list[str]:
    attackers = list(next(iter(r["main"].values()))["privacy"])
    out = ["## Privacy: reconstruction from stored features", "",
           "Each attacker inverts the stored features of the verification faces. Higher PSNR/SSIM, lower MSE and higher "
           "SRRA mean more of the face leaks. SRRA: share of reconstructions whose embedding matches the ORIGINAL "
           "image's embedding at the replay threshold; SRRA (other image): the same against a different image of the "
           "same identity. Columns marked +adaptive: the attacker that knows the defence (its own shadow, AdvFace on "
           "its own faces, trained on protected features); the others are the paper's setting (trained on clean "
           "features).", ""]
    for metric, title, kind in (("psnr", "PSNR (dB), mean ± std over faces", "psnr"), ("ssim", "SSIM", "ssim"),
                                ("mse", "MSE", "mse"), ("srra", "SRRA (replay vs original image)", "srra"),
                                ("srra_other", "SRRA (replay vs another image of the identity)", "srra")):
        rows = []
        for name, rec in r["main"].items():
            cells = []
            for a in attackers:
                p = rec["privacy"][a]
                cell = fmt(p[metric], kind)
                if metric in ("psnr", "ssim", "mse"):
                    cell += f" ± {fmt(p[metric + '_std'], kind)}"
                cells.append(cell)
            rows.append([name, *cells])
        out += [f"### {title}", "", *_table(["protector", *attackers], rows)]
    return out


def _tradeoff(r: dict[str, Any], figure: str | None) -> list[str]:
    if not r["tradeoff"]:
        return []
    rows = [[p["protector"], p["knob"], fmt(p["value"], ""), fmt(p["accuracy"], "accuracy"), p["worst_attacker"],
             fmt(p["psnr"], "psnr"), fmt(p["ssim"], "ssim"), fmt(p["srra"], "srra")] for p in r["tradeoff"]]
    out = ["## Privacy-utility trade-off", "",
           "Protection strength swept per protector (eps: PGD radius for advface and random; dp_epsilon: the DP budget, "
           "smaller is noisier). Privacy is that of the strongest paper-setting attacker (highest PSNR); SRRA the "
           "highest over those attackers. advface at eps 0 stores E(S(z)) unperturbed.", "",
           *_table(["protector", "knob", "value", "accuracy", "strongest attacker", "PSNR", "SSIM", "SRRA"], rows)]
    if figure:
        out += [f"![trade-off]({figure})", ""]
    return out


def _transfer(r: dict[str, Any], figure: str | None) -> list[str]:
    t = r["transfer"]
    if not t:
        return []
    out = ["## Transferability: AdvFace shadow architecture x attacker architecture", "",
           "Rows: the shadow model AdvFace runs PGD against (the bundle's own, or a defender shadow of that "
           "architecture trained on the defender half); columns: paper-setting attackers.", ""]
    for metric, kind in (("psnr", "psnr"), ("ssim", "ssim"), ("srra", "srra")):
        rows = [[f"{s} ({label})", *[fmt(v, kind) for v in t[metric][i]], fmt(t["accuracy"][i], "accuracy")]
                for i, (s, label) in enumerate(zip(t["shadows"], t["shadow_labels"]))]
        out += [f"### {metric.upper()}", "", *_table(["shadow", *t["attackers"], "accuracy"], rows)]
    if figure:
        out += [f"![transferability]({figure})", ""]
    return out


def _tiers(r: dict[str, Any], figures_made: dict[str, str]) -> list[str]:
    t = r.get("tiers") or {}
    if not t:
        return []
    lines = ["## Attacker tiers", "",
             f"{t['privacy_faces']} privacy faces of {t['privacy_identities']} identities; gallery of one other photo of "
             f"{t['gallery_identities']} identities, {t.get('gallery_distractors', 0)} of them distractors that no probe shows (rank-1 chance {fmt(t['chance_rank1'], 'rate')}); attackers trained on "
             f"{t['attacker_faces']} faces of {t['attacker_identities']} identities of their own half; A2 on the first "
             f"{t['inversion_faces']} faces ({t['inversion']['steps']} Adam steps, lr {t['inversion']['lr']:g}, TV "
             f"{t['inversion']['tv_weight']:g}). Judge: {t['judge']} (same image: distance < {t['judge_threshold']:g}; "
             f"SRRA: the project's recogniser at the clean threshold {t['srra_threshold']:.3f}). "
             "`embedding-only` is the floor: the same attacks on e = R(z) alone.", ""]
    lines += _tier_summary(t)
    header = ["protector", "attack", "faces (judged)", "SSIM", "PSNR dB", "dlib same-image", "dlib rank-1", "SRRA"]
    for tier in ("A0", "A1", "A2"):
        rows = [[row["protector"], row["attack"], f"{row['faces']} ({row.get('judged_faces', row['faces'])})", fmt(row["ssim"], "ssim"), fmt(row["psnr"], "psnr"),
                 fmt(row["dlib_same"], "rate"), fmt(row["dlib_rank1"], "rate"), fmt(row["srra"], "rate")]
                for row in t["rows"] if row["tier"] == tier]
        lines += [f"### {TIER_TITLES[tier]}", "", *_table(header, rows)]
        if figures_made.get(f"tier_{tier}"):
            lines += [f"![{tier}]({figures_made[f'tier_{tier}']})", ""]
    best: dict[str, dict[str, Any]] = {}
    for row in t["rows"]:
        if row["dlib_rank1"] is not None and (row["protector"] not in best or
                                               row["dlib_rank1"] > best[row["protector"]]["dlib_rank1"]):
            best[row["protector"]] = row
    by_map = t.get("linkage_by_map", {})
    rows = [[name, fmt(rank, "rate"), *[fmt(by_map[name][m], "rate") if name in by_map else "—" for m in ("mlp", "linear")],
             fmt(best[name]["dlib_rank1"], "rate") if name in best else "n/a",
             best[name]["attack"] if name in best else ""] for name, rank in t["linkage_rank1"].items()]
    lines += [f"### {TIER_TITLES['A3']}", "",
              f"Linkage rank-1 is the better of an MLP student ({t.get('linkage_epochs', t['epochs'])} epochs) and a "
              "linear map fitted in closed form, both from R(stored value) (from e for the floor) to the judge's "
              "embedding, trained on the attacker's faces; `nothing stored` is chance.", "",
              *_table(["protector", "linkage rank-1", "MLP student", "linear map", "best reconstruction rank-1 (judge)",
                       "from"], rows)]
    return lines


def _tier_summary(t: dict[str, Any]) -> list[str]:
    """The strongest attack of each tier per protector (each metric's maximum over the tier's attacks)."""
    summary = t.get("summary")
    if not summary:
        return []
    header = ["stored", *[f"{tier} SSIM / same-image / rank-1" for tier in ("A0", "A1", "A2")], "A3 linkage rank-1"]
    rows = [[name, *[" / ".join([fmt(s[tier]["ssim"], "ssim"), fmt(s[tier]["dlib_same"], "rate"),
                                  fmt(s[tier]["dlib_rank1"], "rate")]) for tier in ("A0", "A1", "A2")],
             fmt(s["A3"], "rate")] for name, s in summary.items()]
    lines = ["### Summary: the strongest attack of each tier", "",
             "Each cell is the maximum over that tier's attacks, per metric. `nothing stored` is the attacker's mean "
             "public face given for every face: it knows no one, yet aligned faces share their layout, so its SSIM "
             "is what pixel similarity gives away for free. `embedding-only or nothing` is the better of it and the "
             "direct attacks on e (whoever holds e can ignore it). `embedding-only, composed` adds what anyone "
             "holding e can also do: compute resynth's stored feature from e (R and the start feature ship with the "
             "backend) and attack that, so it is the best of those rows and resynth's.", "",
             *_table(header, rows)]
    for floor, by_tier in (t.get("resynth_margins") or {}).items():
        parts = [f"{tier}: SSIM {v['ssim']:+.3f}, rank-1 {100 * v['dlib_rank1']:+.1f} points"
                 for tier, v in by_tier.items() if tier != "A3" and v["ssim"] is not None and v["dlib_rank1"] is not None]
        link = by_tier["A3"]["linkage_rank1"]
        parts.append(f"A3 linkage {100 * link:+.1f} points" if link is not None else "A3 linkage n/a")
        lines += [f"resynth minus `{floor}`: " + "; ".join(parts) + ".", ""]
    return lines


def render_report(r: Results) -> str:
    """report.md's text from a results dict (as written to results.json)."""
    figs = r.get("figures", {})
    lines = ["# AdvFace Guard: privacy and utility evaluation", "",
             f"Bundle `{r['bundle']['version']}`; main attacker for figures: `{r['main_attacker']}`. "
             "Every number below is also in results.json.", "",
             *_setup(r), *_networks(r), *_utility(r), *_privacy(r)]
    if figs.get("reconstructions"):
        lines += ["## Reconstructions", "",
                  f"Original faces and what `{r['main_attacker']}` recovers from each stored feature "
                  "(and the adaptive attacker from AdvFace's).", "",
                  f"![reconstructions]({figs['reconstructions']})", ""]
    lines += [*_tiers(r, figs), *_tradeoff(r, figs.get("tradeoff")), *_transfer(r, figs.get("transfer"))]
    return "\n".join(lines)


def write_outputs(results: Results, examples: dict[str, Any], out: Path) -> dict[str, str]:
    """Draws the figures, then writes results.json and report.md into ``out``; returns the figure files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    main_attacker, adaptive = results["main_attacker"], results.get("adaptive_attacker")
    if len(examples["faces"]):
        columns: list[tuple[str, torch.Tensor]] = []
        for name, recon in examples["columns"]:
            columns.append(("unprotected" if name == "none" else name, recon[main_attacker]))
            if name == "advface" and adaptive and adaptive in recon:
                columns.append((f"advface\n({adaptive})", recon[adaptive]))
        reconstruction_grid(examples["faces"], columns, out / FIGURES["reconstructions"])
        made["reconstructions"] = FIGURES["reconstructions"]
    if results["tradeoff"]:
        none = results["main"]["none"]
        attackers = list(results["networks"]["attackers"])
        worst = max(attackers, key=lambda a: none["privacy"][a]["psnr"])
        reference = {"psnr": none["privacy"][worst]["psnr"], "ssim": none["privacy"][worst]["ssim"],
                     "accuracy": none["utility"]["recognizer"]["accuracy"]}
        tradeoff_curve(results["tradeoff"], reference, out / FIGURES["tradeoff"])
        made["tradeoff"] = FIGURES["tradeoff"]
    t = results["transfer"]
    if t:
        transfer_heatmap([f"{s}\n({label})" for s, label in zip(t["shadows"], t["shadow_labels"])],
                                 t["attackers"], t["psnr"], t["ssim"], out / FIGURES["transfer"])
        made["transfer"] = FIGURES["transfer"]
    tiers = examples.get("tiers")
    if tiers is not None and len(tiers["faces"]):
        for tier in ("A0", "A1", "A2"):
            columns = [(f"{name}\n{attack.removeprefix(tier + ' ')[:22]}", recon)
                       for name, sets in tiers["columns"].items() for attack, recon in sets.items()
                       if attack.startswith(tier + " ") and len(recon) == len(tiers["faces"])]
            if columns:
                name = f"tier_{tier}.png"
                reconstruction_grid(tiers["faces"], columns, out / name)
                made[f"tier_{tier}"] = name
    results["figures"] = made
    clean = _clean(results)
    (out / RESULTS).write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    (out / REPORT).write_text(render_report(clean) + "\n")
    return made


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot has no useful static type here
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reconstruction_grid(faces: torch.Tensor, columns: Sequence[tuple[str, torch.Tensor]], path: Path) -> Path:
    """Rows are faces; the first column is the original, then one titled column per reconstruction set."""
    plt = _pyplot()
    rows, cols = len(faces), 1 + len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.7 * rows + 0.5), squeeze=False)
    titles = ["original", *[title for title, _ in columns]]
    images = [faces, *[imgs for _, imgs in columns]]
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[c][r].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tradeoff_curve(points: Sequence[dict[str, Any]], reference: dict[str, float] | None, path: Path) -> Path:
    """Accuracy vs worst-case PSNR and SSIM, one line per protector, each point labelled with its knob value."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "psnr", "PSNR of the strongest attacker (dB)"),
                              (axes[1], "ssim", "SSIM of the strongest attacker")):
        for protector in dict.fromkeys(p["protector"] for p in points):
            pts = sorted((p for p in points if p["protector"] == protector), key=lambda p: p["value"])
            xs, ys = [p[metric] for p in pts], [p["accuracy"] for p in pts]
            ax.plot(xs, ys, marker="o", label=f"{protector} ({pts[0]['knob']})")
            for p in pts:
                ax.annotate(f"{p['value']:g}", (p[metric], p["accuracy"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        if reference is not None:
            ax.scatter([reference[metric]], [reference["accuracy"]], marker="*", s=120, color="black",
                       label="none (unprotected)", zorder=3)
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_xlabel(label + " — lower is more private")
        ax.set_ylabel("verification accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Privacy-utility trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def transfer_heatmap(shadows: Sequence[str], attackers: Sequence[str], psnr: Sequence[Sequence[float]],
                     ssim: Sequence[Sequence[float]], path: Path) -> Path:
    """Two heat maps (PSNR, SSIM): rows are AdvFace's shadow architecture, columns the attacker's."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(4.2 + 1.4 * len(attackers) * 2, 1.2 + 0.8 * len(shadows)))
    for ax, values, title, fmt in ((axes[0], psnr, "attacker PSNR (dB)", "{:.2f}"), (axes[1], ssim, "attacker SSIM", "{:.3f}")):
        m = np.asarray(values, dtype=float)
        im = ax.imshow(m, cmap="viridis_r", aspect="auto")
        low, high = np.nanmin(m), np.nanmax(m)
        span = high - low if high > low else 1.0
        ax.set_xticks(range(len(attackers)), attackers)
        ax.set_yticks(range(len(shadows)), shadows)
        ax.set_xlabel("attacker architecture")
        ax.set_ylabel("AdvFace shadow architecture")
        ax.set_title(title + " — lower is more private", fontsize=9)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                # viridis_r is bright at the low end: dark text there, white text on the dark cells.
                dark_cell = (m[i, j] - low) / span > 0.5
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if dark_cell else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
