"""Figures people would rather look at than numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from alpaca_lora.common.paths import atomic_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(log_history: list[dict], path: str | Path, title: str = "") -> bool:
    """Training (and validation) loss against the optimizer step; False when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return True
