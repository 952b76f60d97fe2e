"""Plots for the package README: training curve and confusion matrix (PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curve(history: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax1.plot(epochs, [h["valid_loss"] for h in history], marker="o", label="valid loss")
    ax2.plot(epochs, [100 * h["accuracy"] for h in history], marker="o", color="tab:green")
    for boundary in [h["epoch"] - 0.5 for a, h in zip(history, history[1:], strict=False) if h["stage"] != a["stage"]]:
        for ax in (ax1, ax2):
            ax.axvline(boundary, color="gray", linestyle=":", linewidth=1)
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix_plot(
    targets: np.ndarray, predicted: np.ndarray, labels: Sequence[str], path: Path
) -> Path:
    plt = _pyplot()
    n = len(labels)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (targets, predicted), 1)
    side = min(12.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black", fontsize=8)
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="actual", title="confusion matrix (validation, plain)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def lr_find_plot(finds: Sequence[Any], path: Path) -> Path:
    """Loss against learning rate for each stage's ``lr_find``, its suggestion marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for find in finds:
        line, = ax.plot(find.lrs, find.losses, label=f"stage {find.stage}")
        ax.axvline(find.suggested, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss",
           title="lr_find (dotted: the rate used)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
