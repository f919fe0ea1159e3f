"""Figures people would rather look at than read: AUROC per disease, loss curves, task matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _nan(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_auroc_bars(ax: plt.Axes, named: dict[str, dict[str, float | None]]) -> None:
    """Grouped bars of per-class AUROC, one group per disease, one bar per named model."""
    diseases = list(next(iter(named.values())))
    width = 0.8 / len(named)
    for i, (name, aurocs) in enumerate(named.items()):
        ax.bar(np.arange(len(diseases)) + i * width, _nan([aurocs[d] for d in diseases]), width, label=name)
    ax.set_xticks(np.arange(len(diseases)) + 0.4 - width / 2, diseases, rotation=30, ha="right")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("AUROC")
    ax.legend(fontsize=8)


def plot_matrix(ax: plt.Axes, matrix: list[list[float | None]], labels: list[str], title: str) -> None:
    """Heat map of ``matrix[i][j]``: AUROC on task j's test data after task i."""
    data = np.array([_nan(row) for row in matrix])
    image = ax.imshow(data, vmin=0.5, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), [f"after {name}" for name in labels], fontsize=8)
    for (i, j), value in np.ndenumerate(data):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title(title)
    plt.colorbar(image, ax=ax, fraction=0.046)


def plot_partition(ax: plt.Axes, partition: dict) -> None:
    """Heat map of a simulation's partition: per hospital (rows, with their image counts, every split) and disease
    (columns), the positive images (the number) and their share of the hospital's images (the colour); a disease a
    hospital does not label shows '–'."""
    hospitals, diseases = partition["per_hospital"], partition["diseases"]
    images = partition["images"]
    counts = np.array([_nan([h["positives"][d] for d in diseases]) for h in hospitals])
    share = counts / np.maximum(np.array(images, dtype=float), 1)[:, None]
    image = ax.imshow(np.ma.masked_invalid(share), vmin=0, vmax=max(float(np.nanmax(share, initial=0)), 0.01),
                      cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(diseases)), diseases, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(hospitals)), [f"{h['name']} ({n:,} images)" for h, n in zip(hospitals, images)],
                  fontsize=8)
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, "–" if np.isnan(value) else f"{int(value):,}", ha="center", va="center", fontsize=7,
                color="white" if not np.isnan(value) and share[i, j] > 0.6 * np.nanmax(share) else "black")
    ax.set_title(f"positives per disease per hospital\n{partition['description']}", fontsize=9)
    plt.colorbar(image, ax=ax, fraction=0.046, label="share of the hospital's images")


def plot_training(metrics: dict, path: Path) -> Path:
    """``metrics.png`` of ``retune train``: AUROC per disease vs zero-shot, loss per epoch, task matrix."""
    incremental = "task_matrix" in metrics
    fig, axes = plt.subplots(1, 3 if incremental else 2, figsize=(15 if incremental else 10, 4.2))
    plot_auroc_bars(axes[0], {"zero-shot": metrics["zero_shot"]["per_class_auroc"],
                              "adaptors": metrics["per_class_auroc"]})
    axes[0].set_title(f"macro AUROC {metrics['zero_shot']['macro_auroc']:.3f} → {metrics['macro_auroc']:.3f}")
    for t, losses in enumerate(metrics["loss_per_epoch"]):
        axes[1].plot(range(1, len(losses) + 1), losses, label=metrics.get("tasks", ["joint"])[t])
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("masked BCE")
    axes[1].set_title("training loss per task")
    axes[1].legend(fontsize=8)
    if incremental:
        plot_matrix(axes[2], metrics["task_matrix"], metrics["tasks"],
                    f"task matrix (forgetting {metrics['forgetting'] or 0:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
