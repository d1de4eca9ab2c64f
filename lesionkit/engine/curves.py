"""``curves.png``: the training loss per step (raw and smoothed) and validation metrics per epoch."""

from __future__ import annotations

import math
from pathlib import Path

VAL_METRICS = ("val_dice", "val_iou", "val_per_image_dice", "val_isic_jaccard")


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); ``weight`` defaults to a
    window of about 5 % of the points."""
    if weight is None:
        weight = 1.0 - 1.0 / max(1.0, 0.05 * len(values))
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm if norm > 0 else v)
    return out


def _floats(rows: list[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        try:
            x, y = float(row[x_key]), float(row[y_key])
        except (TypeError, ValueError, KeyError):
            continue
        if math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot_curves(rows: list[dict], path: str | Path, steps: list[dict] | None = None) -> None:
    """Two panels: training loss against epoch (per step from ``steps`` rows ``{"epoch": float,
    "loss": ..}`` when given, else per epoch from ``rows``) and validation metrics per epoch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    if steps:
        xs, ys = _floats(steps, "epoch", "loss")
        if xs:
            ax_loss.plot(xs, ys, color="tab:blue", alpha=0.25, linewidth=0.8, label="per step")
            ax_loss.plot(xs, smooth(ys), color="tab:blue", linewidth=1.8, label="smoothed")
    else:
        xs, ys = _floats(rows, "epoch", "train_loss")
        if xs:
            ax_loss.plot(xs, ys, "o-", color="tab:blue", label="epoch mean")
    ax_loss.set_title("training loss")
    ax_val.set_title("validation")
    for key in VAL_METRICS:
        xs, ys = _floats(rows, "epoch", key)
        if xs:
            ax_val.plot(xs, ys, "o-", markersize=3, label=key.removeprefix("val_"))
    for ax in (ax_loss, ax_val):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))  # round ticks
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            # Below the axes, so the legend never covers a line.
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, frameon=False, fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", color="0.5")
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["plot_curves", "smooth"]
