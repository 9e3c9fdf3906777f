"""PNG figures of an evaluation: the similarity histogram and the ROC curve (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from search.calibration import Calibration
from search.metrics import Verification, roc_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histogram(result: Verification, path: Path, title: str, calibration: Calibration | None = None) -> Path:
    """Same-person and different-person cosine distributions, each normalised to area 1."""
    plt = _pyplot()
    edges = result.bin_edges
    used = np.flatnonzero(result.genuine_hist + result.impostor_hist)
    lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, len(edges) - 1)
    step = max(1, (hi - lo) // 120)  # ~120 visible bins over the used range
    starts = np.arange(lo, hi, step)
    coarse = np.append(edges[starts], edges[min(starts[-1] + step, len(edges) - 1)])
    genuine = np.add.reduceat(result.genuine_hist[:hi], starts)
    impostor = np.add.reduceat(result.impostor_hist[:hi], starts)
    width = np.diff(coarse)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for counts, total, colour, label in (
        (impostor, result.impostor_pairs, "tab:red", f"different people ({result.impostor_pairs:,} pairs)"),
        (genuine, result.genuine_pairs, "tab:green", f"same person ({result.genuine_pairs:,} pairs)"),
    ):
        density = counts[: len(width)] / max(total, 1) / width
        ax.bar(coarse[:-1], density, width=width, align="edge", color=colour, alpha=0.55, label=label)
    top = ax.get_ylim()[1]
    for i, point in enumerate(result.points):
        ax.axvline(point.threshold, color="black", lw=0.8, ls="--")
        ax.text(point.threshold, top * (0.97 - 0.1 * i), f" FPR {point.target_fpr:.0e}: {point.threshold:.3f}",
                fontsize=7, va="top")
    if calibration is not None:
        ax.axvspan(calibration.uncertain_threshold, calibration.threshold, color="gold", alpha=0.15,
                   label="uncertain band")
    ax.set_xlim(edges[lo] - 0.02, edges[hi] + 0.02)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_roc(result: Verification, path: Path, title: str) -> Path:
    """TPR against FPR (log scale), with the exact operating points marked."""
    plt = _pyplot()
    fpr, tpr = roc_curve(result)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    floor = 1.0 / max(result.impostor_pairs, 1)
    keep = fpr >= floor
    ax.plot(fpr[keep], tpr[keep], color="tab:blue", label=f"ROC, AUC {result.auc:.5f}")
    for point in result.points:
        ax.plot(point.fpr if point.fpr > 0 else floor, point.tpr, "o", color="black", ms=4)
        ax.annotate(f"TPR {point.tpr:.3f} @ {point.target_fpr:.0e}", (max(point.fpr, floor), point.tpr),
                    textcoords="offset points", xytext=(6, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(max(0.0, min(tpr[keep].min() if keep.any() else 0, 0.9) - 0.05), 1.005)
    ax.set_xlabel("false-positive rate (different people accepted)")
    ax.set_ylabel("true-positive rate (same person accepted)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
