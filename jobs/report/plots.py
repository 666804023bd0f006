"""The report's plots as PNG bytes (matplotlib, no pyplot).

Figures are built with ``matplotlib.figure.Figure`` and rendered by its Agg canvas, so nothing
here touches pyplot's global backend or needs a display, and a Ray driver or worker that imports
this module is unaffected.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
BLUE, ORANGE, GREY = "#0969da", "#bc4c00", "#57606a"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def histogram_counts(values: Sequence[float], bins: int = 10) -> tuple[list[float], list[int]]:
    """Bin edges and counts over [0, 1] (the same bins as summary.json's recall histogram)."""
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins, range=(0.0, 1.0))
    return [round(float(e), 3) for e in edges], counts.astype(int).tolist()


def recall_histogram(values: Sequence[float], title: str = "Object recall per image") -> bytes:
    return _png(recall_histogram_figure(values, title))


def recall_histogram_figure(values: Sequence[float], title: str = "Object recall per image") -> Figure:
    edges, counts = histogram_counts(values)
    fig = Figure(figsize=(5.2, 3.0), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=BLUE, edgecolor="white")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(counts, default=0) * 1.25 + 0.5)  # headroom for the legend
    ax.set_xlabel("recall (found / scorable objects)")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    mean = float(np.mean(values)) if len(values) else math.nan
    if not math.isnan(mean):
        ax.axvline(mean, color=ORANGE, linestyle="--", linewidth=1.2, label=f"mean {mean:.3f}")
        ax.legend(fontsize=8, loc="upper center")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def max_recall_curve(ns: Sequence[int], means: Sequence[float], title: str = "SBPC: best of n candidates") -> bytes:
    return _png(max_recall_curve_figure(ns, means, title))


def max_recall_curve_figure(ns: Sequence[int], means: Sequence[float],
                            title: str = "SBPC: best of n candidates") -> Figure:
    fig = Figure(figsize=(5.2, 3.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(ns, means, marker="o", color=BLUE, linewidth=1.5, markersize=4)
    ax.set_xlabel("number of candidates n")
    ax.set_ylabel("average max recall")
    ax.set_ylim(0, 1.02)
    if ns:
        ax.set_xlim(min(ns) - 0.3, max(ns) + 0.3)
        if len(ns) <= 16:
            ax.set_xticks(list(ns))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


LOSS_KEYS = ("loss_total", "loss_recon", "loss_clip", "loss_mmd", "loss_adversarial", "loss_layout", "val_loss")


def loss_curves(metrics: Sequence[dict]) -> bytes:
    return _png(loss_curves_figure(metrics))


def loss_curves_figure(metrics: Sequence[dict]) -> Figure:
    """Every loss column present in metrics.jsonl against step, and the learning rate below."""
    steps_of = {key: [(m["step"], m[key]) for m in metrics if _finite(m.get(key)) and _finite(m.get("step"))]
                for key in LOSS_KEYS}
    lr = [(m["step"], m["lr"]) for m in metrics if _finite(m.get("lr")) and _finite(m.get("step"))]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    positive = True
    for key, points in steps_of.items():
        if not points:
            continue
        xs, ys = zip(*points)
        positive &= min(ys) > 0
        style = {"marker": "o", "linestyle": "--"} if key == "val_loss" else {}
        ax.plot(xs, ys, label=key, linewidth=1.3, markersize=3, **style)
    if positive and ax.lines:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_title("Training losses", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    if lr:
        xs, ys = zip(*lr)
        ax_lr.plot(xs, ys, color=GREY, linewidth=1.2)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    return fig


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
