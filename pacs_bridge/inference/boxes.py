"""Fracture boxes from a centre heatmap: peaks, and the half-maximum extent around each.

A ``centre`` heatmap (models 2.x, manifest ``outputs.heatmap_kind``) holds,
per cell of a grid of stride ``s`` over the square model input, the
probability that a fracture's centre lies there. The trainer's targets are
Gaussians that are 1 at a box's centre and ``extent`` (0.5) on its edges, so:

1. a **peak** is a cell that is the maximum of its 3 x 3 neighbourhood and at
   least ``min_score``; peaks are taken in decreasing order, at most
   ``max_boxes``, and a peak that falls inside the box of a stronger one is
   dropped (one fracture, one box);
2. the **box** of a peak is the bounding rectangle of the 8-connected cells
   at or above ``extent`` x the peak value that hold the peak, in input
   pixels, mapped back to the original image through its letterbox
   (:class:`pacs_bridge.imaging.preprocess.Letterbox`);
3. the box's **score** is the peak value.

An image whose map has no cell at ``min_score`` gets no box and no peak, so
nothing is drawn over empty background.

With ``flagged_min_score`` set (models from 2.1.0), the marks follow the
call: an image the model flags (probability at or above the manifest's
threshold) always gets its strongest peak, from ``flagged_min_score`` up, and
further peaks from ``min_score``; an image below the threshold gets none. So
a suspected fracture is always shown where the model sees it, and an image
called negative never carries a mark, as in the commercial readers. These are the boxes shown to the
radiologist (the SCOORD in the TID 1500 SR, PS3.16, and the outline on the
annotated secondary capture, PS3.3 A.8).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.preprocess import Letterbox

__all__ = ["CentreBoxes", "LocalisationSpec", "centre_boxes"]

LOGGER = logging.getLogger(__name__)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class LocalisationSpec:
    """How boxes are read from the heatmap (the manifest's ``localisation`` block)."""

    min_score: float = 0.2
    extent: float = 0.5
    max_boxes: int = 3
    flagged_min_score: float | None = None
    """When set: boxes only on flagged images, whose strongest peak counts from this score."""

    def __post_init__(self) -> None:
        if not 0.0 < self.min_score < 1.0:
            raise ValueError("localisation.min_score must be in (0, 1)")
        if self.flagged_min_score is not None and not 0.0 < self.flagged_min_score <= self.min_score:
            raise ValueError("localisation.flagged_min_score must be in (0, min_score]")
        if not 0.0 < self.extent < 1.0:
            raise ValueError("localisation.extent must be in (0, 1)")
        if not 1 <= self.max_boxes <= 20:
            raise ValueError("localisation.max_boxes must be 1..20")


@dataclass(frozen=True)
class CentreBoxes:
    """Boxes (``(x0, y0, x1, y1)`` original pixels, ``x1``/``y1`` exclusive) with scores, best first; the top peak."""

    boxes: list[tuple[Box, float]]
    peak: tuple[int, int] | None


def _to_original(x: float, y: float, letterbox: Letterbox) -> tuple[float, float]:
    return (x - letterbox.pad_x) / letterbox.scale, (y - letterbox.pad_y) / letterbox.scale


def centre_boxes(
    heatmap: npt.NDArray[np.floating], letterbox: Letterbox, spec: LocalisationSpec, *, flagged: bool | None = None
) -> CentreBoxes:
    """Read the boxes of a ``(h, w)`` centre heatmap over the square input (see the module docstring).

    ``flagged`` is whether the image's probability reaches the threshold; with
    ``spec.flagged_min_score`` set, an image not flagged gets no box, and a
    flagged one its strongest peak from that score. ``None`` (the call not
    known) reads every peak from ``min_score``.
    """
    first_floor = spec.min_score
    if spec.flagged_min_score is not None and flagged is not None:
        if not flagged:
            return CentreBoxes(boxes=[], peak=None)
        first_floor = spec.flagged_min_score
    grid = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if grid.ndim != 2 or grid.shape[0] == 0:
        raise ValueError(f"heatmap must be 2-D, got shape {grid.shape}")
    rows, cols = grid.shape
    stride_y, stride_x = letterbox.size / rows, letterbox.size / cols
    local_max = cv2.dilate(grid, np.ones((3, 3), np.uint8))
    candidates = np.argwhere((grid >= local_max) & (grid >= first_floor))
    order = sorted(((float(grid[r, c]), int(r), int(c)) for r, c in candidates), reverse=True)
    height, width = letterbox.shape
    boxes: list[tuple[Box, float]] = []
    grid_boxes: list[tuple[int, int, int, int]] = []
    peak: tuple[int, int] | None = None
    for value, r, c in order:
        if len(boxes) >= spec.max_boxes or (boxes and value < spec.min_score):
            break
        if any(gx0 <= c < gx1 and gy0 <= r < gy1 for gx0, gy0, gx1, gy1 in grid_boxes):
            continue
        hot = np.ascontiguousarray(grid >= value * spec.extent).view(np.uint8).copy()
        _, _, _, rect = cv2.floodFill(hot, None, (c, r), 2, 0, 0, 8 | cv2.FLOODFILL_FIXED_RANGE)
        gx, gy, gw, gh = (int(v) for v in rect)
        grid_boxes.append((gx, gy, gx + gw, gy + gh))
        x0, y0 = _to_original(gx * stride_x, gy * stride_y, letterbox)
        x1, y1 = _to_original((gx + gw) * stride_x, (gy + gh) * stride_y, letterbox)
        box = (
            int(np.clip(np.floor(x0), 0, width - 1)),
            int(np.clip(np.floor(y0), 0, height - 1)),
            int(np.clip(np.ceil(x1), 1, width)),
            int(np.clip(np.ceil(y1), 1, height)),
        )
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        boxes.append((box, value))
        if peak is None:
            px, py = _to_original((c + 0.5) * stride_x, (r + 0.5) * stride_y, letterbox)
            peak = (int(np.clip(px, 0, width - 1)), int(np.clip(py, 0, height - 1)))
    return CentreBoxes(boxes=boxes, peak=peak)
