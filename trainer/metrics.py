"""Classification and localisation metrics (numpy + scikit-learn), with bootstrap intervals."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

LOGGER = logging.getLogger(__name__)

__all__ = [
    "binary_metrics",
    "bootstrap_ci",
    "box_area_fraction",
    "box_iou",
    "choose_threshold",
    "choose_threshold_at_specificity",
    "delong_test",
    "paired_bootstrap_auc",
    "peak_in_boxes",
    "point_in_boxes",
    "roc_auc",
]

Array = npt.NDArray[Any]


def roc_auc(labels: Array, scores: Array) -> float:
    """ROC AUC, ``nan`` when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    if labels.size == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def choose_threshold(labels: Array, scores: Array, min_sensitivity: float = 0.90) -> float:
    """Highest threshold ``t`` (predict positive when ``score >= t``) with sensitivity >= ``min_sensitivity``."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.sort(scores[labels == 1])[::-1]
    if positives.size == 0:
        raise ValueError("cannot choose a threshold without positive examples")
    needed = int(np.ceil(min_sensitivity * positives.size - 1e-9))
    needed = min(max(needed, 1), positives.size)
    return float(positives[needed - 1])


def choose_threshold_at_specificity(labels: Array, scores: Array, min_specificity: float = 0.72) -> float:
    """Lowest threshold ``t`` (predict positive when ``score >= t``) with specificity >= ``min_specificity``.

    The most sensitive operating point that keeps the specificity. Anchored on
    the negatives, which outnumber the positives about five to one in a
    radiograph split, it moves less from one split to the next than a
    threshold read off the few positives (:func:`choose_threshold`).
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    negatives = np.sort(scores[labels == 0])
    if negatives.size == 0:
        raise ValueError("cannot choose a threshold without negative examples")
    if not 0.0 < min_specificity <= 1.0:
        raise ValueError(f"specificity must be in (0, 1], got {min_specificity}")
    needed = int(np.ceil(min_specificity * negatives.size - 1e-9))
    needed = min(max(needed, 1), negatives.size)
    # The needed-th lowest negative must fall below t: t sits halfway to the next higher score of
    # the split, so that rounding t in the manifest moves no image across it.
    below = negatives[needed - 1]
    above = scores[scores > below]
    if above.size == 0:
        return float(np.nextafter(below, np.inf))
    return float((below + above.min()) / 2.0)


def binary_metrics(labels: Array, scores: Array, threshold: float) -> dict[str, Any]:
    """Confusion matrix and the usual rates at ``threshold`` (``score >= threshold`` is positive)."""
    labels = np.asarray(labels).astype(int)
    predicted = (np.asarray(scores) >= threshold).astype(int)
    tp = int(np.sum((predicted == 1) & (labels == 1)))
    tn = int(np.sum((predicted == 0) & (labels == 0)))
    fp = int(np.sum((predicted == 1) & (labels == 0)))
    fn = int(np.sum((predicted == 0) & (labels == 1)))

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else float("nan")

    precision = ratio(tp, tp + fp)
    sensitivity = ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "n": len(labels),
        "positives": int(labels.sum()),
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, len(labels)),
        "precision": precision,
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "f1": f1,
        "roc_auc": roc_auc(labels, scores),
        "confusion_matrix": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def bootstrap_ci(
    labels: Array,
    scores: Array,
    threshold: float,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    keys: Sequence[str] = ("roc_auc", "sensitivity", "specificity", "accuracy", "f1"),
) -> dict[str, list[float]]:
    """Percentile 95% intervals from resampling images with replacement."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {k: [] for k in keys}
    n = len(labels)
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        if labels[idx].min() == labels[idx].max():
            continue
        m = binary_metrics(labels[idx], scores[idx], threshold)
        for key in keys:
            values[key].append(m[key])
    out: dict[str, list[float]] = {}
    for key, vals in values.items():
        arr = np.asarray(vals, dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        out[key] = (
            [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))]
            if arr.size
            else [
                float("nan"),
                float("nan"),
            ]
        )
    return out


def peak_in_boxes(heatmap: Array, boxes: Sequence[Sequence[float]]) -> bool:
    """Whether the maximum of ``heatmap`` (in the image's pixel grid) lies inside any ``[x0, y0, x1, y1]``."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return any(b[0] <= col <= b[2] and b[1] <= row <= b[3] for b in boxes)


def box_area_fraction(shape: tuple[int, int], boxes: Sequence[Sequence[float]]) -> float:
    """Share of the image covered by the union of the boxes (chance of a uniformly random point)."""
    rows, cols = shape
    mask = np.zeros((rows, cols), dtype=bool)
    for b in boxes:
        x0, y0 = max(0, int(np.floor(b[0]))), max(0, int(np.floor(b[1])))
        x1, y1 = min(cols - 1, int(np.ceil(b[2]))), min(rows - 1, int(np.ceil(b[3])))
        if x1 >= x0 and y1 >= y0:
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return float(mask.mean())


def point_in_boxes(point: Sequence[float], boxes: Sequence[Sequence[float]], margin: float = 0.0) -> bool:
    """Whether ``(x, y)`` lies inside any ``[x0, y0, x1, y1]`` grown by ``margin`` pixels on every side."""
    x, y = float(point[0]), float(point[1])
    return any(b[0] - margin <= x <= b[2] + margin and b[1] - margin <= y <= b[3] + margin for b in boxes)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _midranks(values: Array) -> Array:
    order = np.argsort(values, kind="mergesort")
    ranked = values[order]
    n = len(values)
    mid = np.zeros(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and ranked[j] == ranked[i]:
            j += 1
        mid[i:j] = 0.5 * (i + j - 1) + 1.0
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = mid
    return out


def delong_test(labels: Array, scores_a: Array, scores_b: Array) -> dict[str, float]:
    """DeLong's test for two correlated ROC AUCs on the same images (DeLong et al., Biometrics 1988).

    Uses the fast midrank algorithm (Sun and Xu, IEEE SPL 2014). Returns both
    AUCs, their difference ``a - b``, its standard error, ``z`` and the
    two-sided ``p`` value.
    """
    from scipy.stats import norm

    labels = np.asarray(labels).astype(int)
    pos, neg = labels == 1, labels == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise ValueError("DeLong's test needs at least two images of each class")
    aucs, v10, v01 = [], [], []
    for scores in (np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)):
        x, y = scores[pos], scores[neg]
        tx, ty, tz = _midranks(x), _midranks(y), _midranks(np.concatenate([x, y]))
        aucs.append(float(tz[:m].sum() / (m * n) - (m + 1.0) / (2.0 * n)))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = aucs[0] - aucs[1]
    se = float(np.sqrt(max(var, 1e-300)))
    z = diff / se
    return {
        "auc_a": aucs[0],
        "auc_b": aucs[1],
        "difference": diff,
        "se": se,
        "z": float(z),
        "p_value": float(2.0 * norm.sf(abs(z))),
    }


def paired_bootstrap_auc(
    labels: Array, scores_a: Array, scores_b: Array, *, n_resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """95% interval of ``AUC(a) - AUC(b)`` from resampling the same images for both, and the share <= 0."""
    labels = np.asarray(labels).astype(int)
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    rng = np.random.default_rng(seed)
    diffs = []
    n = len(labels)
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        if labels[idx].min() == labels[idx].max():
            continue
        diffs.append(roc_auc(labels[idx], a[idx]) - roc_auc(labels[idx], b[idx]))
    arr = np.asarray(diffs)
    return {
        "difference_ci95": [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))],
        "share_not_better": float(np.mean(arr <= 0.0)),
        "resamples": int(arr.size),
    }
