"""Evaluation plots (matplotlib, written as PNG files)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

LOGGER = logging.getLogger(__name__)

__all__ = [
    "plot_calibration",
    "plot_confusion",
    "plot_heatmaps",
    "plot_pr",
    "plot_roc",
    "plot_training_curves",
]

Array = npt.NDArray[Any]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_roc(
    labels: Array,
    scores: Array,
    auc: float,
    ci: Sequence[float],
    threshold_point: tuple[float, float],
    *,
    path: Path,
) -> Path:
    """ROC curve with the operating point (1 - specificity, sensitivity)."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.plot(*threshold_point, "o", color="red", label="operating point")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, test split", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(labels: Array, scores: Array, path: Path) -> Path:
    """Precision-recall curve with the prevalence as the chance line."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = _pyplot()
    precision, recall, _ = precision_recall_curve(labels, scores)
    ap = average_precision_score(labels, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(recall, precision, label=f"AP {ap:.3f}")
    ax.axhline(float(np.mean(labels)), linestyle="--", color="grey", linewidth=0.8, label="prevalence")
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title="Precision-recall, test split",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_confusion(cm: dict[str, int], path: Path) -> Path:
    """2x2 confusion matrix (rows: truth, columns: prediction)."""
    plt = _pyplot()
    matrix = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="black", fontsize=12)
    ax.set_xticks([0, 1], ["no fracture", "fracture"])
    ax.set_yticks([0, 1], ["no fracture", "fracture"])
    ax.set(xlabel="predicted", ylabel="truth", title="Confusion matrix, test split")
    return _save(fig, path)


def plot_calibration(labels: Array, scores: Array, path: Path, bins: int = 10) -> Path:
    """Reliability diagram: observed fracture rate per predicted-probability bin."""
    plt = _pyplot()
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(scores, edges) - 1, 0, bins - 1)
    centres, observed, counts = [], [], []
    for b in range(bins):
        mask = index == b
        if mask.any():
            centres.append(float(np.mean(scores[mask])))
            observed.append(float(np.mean(labels[mask])))
            counts.append(int(mask.sum()))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.plot(centres, observed, "o-")
    for x, y, n in zip(centres, observed, counts, strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set(
        xlabel="predicted probability",
        ylabel="observed fracture rate",
        title="Calibration, test split",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    return _save(fig, path)


def plot_training_curves(history_csv: Path, path: Path) -> Path | None:
    """Loss and validation AUC per epoch from Keras' CSV log."""
    if not Path(history_csv).is_file():
        return None
    with Path(history_csv).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    plt = _pyplot()
    epochs = [int(r["epoch"]) + 1 for r in rows]

    def col(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    # 1.x logs "probability_*"; the heatnet logs "classifier_*" and "heatmap_loss" (focal loss).
    curves = (
        ("probability_loss", "train"),
        ("val_probability_loss", "validation"),
        ("classifier_loss", "train, classifier"),
        ("val_classifier_loss", "validation, classifier"),
        ("heatmap_loss", "train, heatmap (focal)"),
        ("val_heatmap_loss", "validation, heatmap (focal)"),
    )
    for name, label in curves:
        if name in rows[0]:
            left.plot(epochs, col(name), label=label)
    left.set(xlabel="epoch", ylabel="loss", title="Loss")
    left.legend(fontsize=7)
    for name, label in (
        ("probability_auc", "train"),
        ("val_probability_auc", "validation"),
        ("classifier_auc", "train"),
        ("val_classifier_auc", "validation (EMA weights)"),
    ):
        if name in rows[0]:
            right.plot(epochs, col(name), label=label)
    right.set(xlabel="epoch", ylabel="ROC AUC", title="Fracture AUC")
    right.legend(fontsize=8)
    return _save(fig, path)


def plot_heatmaps(examples: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Image, ground-truth boxes (green), predicted boxes (red, dashed), heatmap overlay and peak (red x)."""
    if not examples:
        return None
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, len(examples), figsize=(3.2 * len(examples), 3.6))
    for ax, ex in zip(np.atleast_1d(axes), examples, strict=True):
        ax.imshow(ex["image"], cmap="gray")
        ax.imshow(ex["heatmap"], cmap="jet", alpha=0.35)
        for b in ex["boxes"]:
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor="lime", linewidth=1.5))
        for b in ex.get("pred_boxes") or []:
            ax.add_patch(
                Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, edgecolor="red", linewidth=1.2, ls="--")
            )
        if "peak" in ex:
            if ex["peak"] is not None:
                ax.plot(ex["peak"][0], ex["peak"][1], "x", color="red", markersize=10, markeredgewidth=2)
        else:
            row, col = np.unravel_index(int(np.argmax(ex["heatmap"])), ex["heatmap"].shape)
            ax.plot(col, row, "x", color="red", markersize=10, markeredgewidth=2)
        ax.set_title(f"{ex['title']}\np={ex['probability']:.2f}", fontsize=8)
        ax.axis("off")
    return _save(fig, path)
