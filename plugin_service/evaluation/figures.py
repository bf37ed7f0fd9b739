"""The report's PNG figures, drawn with matplotlib's Agg backend (no display needed).

* :func:`reconstruction_grid`: original faces next to what the main attacker recovers from the
  unprotected and from each protected feature (paper Fig. 5).
* :func:`tradeoff_curve`: verification accuracy against the strongest attacker's PSNR and SSIM
  as the protection strength varies (paper Fig. 4).
* :func:`transfer_heatmap`: attacker PSNR/SSIM for every shadow x attacker architecture (paper Table 4).

Each takes plain numbers/tensors and a path, so the figures can be redrawn from results.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
