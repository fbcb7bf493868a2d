"""Dense localisation targets: a Gaussian per fracture box on the heatmap grid (CenterNet-style).

For a box of width ``w`` and height ``h`` (tensor pixels) centred at
``(cx, cy)``, the target on the grid of stride ``s`` is
``exp(-(dx^2 / 2 sx^2 + dy^2 / 2 sy^2))`` with ``sx = 0.425 w / s`` and
``sy = 0.425 h / s`` (at least ``min_sigma`` cells): 1 at the centre and
0.5 on the box's edges, so the half-maximum extent of a predicted peak
reads back as the box (:mod:`pacs_bridge.inference.boxes`). Several boxes
take the maximum; the cell holding each centre is exactly 1 (the positive of
the focal loss). Images without boxes get an all-zero map.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

LOGGER = logging.getLogger(__name__)

__all__ = ["HALF_MAX_SIGMA", "centre_heatmap", "focal_loss"]

HALF_MAX_SIGMA = 0.425
"""sigma / box side: the Gaussian falls to one half at the box edge (1 / (2 sqrt(2 ln 2)))."""


def centre_heatmap(
    boxes: npt.NDArray[np.float32], size: int, stride: int, min_sigma: float = 0.8
) -> npt.NDArray[np.float32]:
    """The ``(size / stride)``-square target map of ``boxes`` (``[x0, y0, x1, y1]`` in tensor pixels)."""
    side = size // stride
    target = np.zeros((side, side), dtype=np.float32)
    centres = (np.arange(side, dtype=np.float32) + 0.5) * stride
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        w, h = max(float(x1 - x0), 1.0), max(float(y1 - y0), 1.0)
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        sx = max(HALF_MAX_SIGMA * w / stride, min_sigma)
        sy = max(HALF_MAX_SIGMA * h / stride, min_sigma)
        gx = np.exp(-(((centres - cx) / stride) ** 2) / (2 * sx * sx))
        gy = np.exp(-(((centres - cy) / stride) ** 2) / (2 * sy * sy))
        np.maximum(target, np.outer(gy, gx).astype(np.float32), out=target)
        col = int(np.clip(cx // stride, 0, side - 1))
        row = int(np.clip(cy // stride, 0, side - 1))
        target[row, col] = 1.0
    return target


def focal_loss(alpha: float = 2.0, beta: float = 4.0, positives_per_image: float = 0.25):  # type: ignore[no-untyped-def]
    """CenterNet's penalty-reduced focal loss on ``[N, h, w]`` maps, one value per image.

    ``-(1-p)^alpha log p`` on centre cells (target 1), ``-(1-y)^beta p^alpha
    log(1-p)`` elsewhere, summed over the map and divided by the expected
    number of centres per image, so that the per-image mean Keras takes
    matches CenterNet's normalisation by the number of centres.
    """
    from keras import ops

    def loss(y_true, y_pred):  # type: ignore[no-untyped-def]
        p = ops.clip(y_pred, 1e-5, 1.0 - 1e-5)
        pos = ops.cast(ops.greater_equal(y_true, 0.999), p.dtype)
        pos_term = -ops.power(1.0 - p, alpha) * ops.log(p) * pos
        neg_term = -ops.power(1.0 - y_true, beta) * ops.power(p, alpha) * ops.log(1.0 - p) * (1.0 - pos)
        return ops.sum(pos_term + neg_term, axis=(1, 2)) / positives_per_image

    return loss
