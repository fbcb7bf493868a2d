"""Class-activation maps back on the original image: normalised map, hottest region, peak.

The model's ``heatmap`` output covers the square letterboxed input
(:mod:`pacs_bridge.imaging.preprocess`). :func:`locate` maps it back to the
original pixel grid with :func:`~pacs_bridge.imaging.preprocess.to_original`
(padding removed, original rows x columns), rescales it to ``[0, 1]``, and
returns the bounding box of the hottest region: the 8-connected component,
containing the peak, of the pixels at or above ``threshold`` x the maximum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.preprocess import Letterbox, to_original

__all__ = ["HeatmapResult", "locate", "normalise"]

LOGGER = logging.getLogger(__name__)

FloatImage = npt.NDArray[np.float32]


@dataclass(frozen=True)
class HeatmapResult:
    """A heatmap on the original pixel grid and its hottest region.

    ``box`` is ``[x0, y0, x1, y1]`` in original pixel coordinates, ``x1`` and
    ``y1`` exclusive (width = ``x1 - x0``); ``peak`` is ``(x, y)``. Both are
    ``None`` when the map is flat (no region stands out).
    """

    heatmap: FloatImage
    box: list[int] | None
    peak: tuple[int, int] | None


def normalise(heatmap: npt.NDArray[np.floating]) -> FloatImage:
    """Min-max scale to ``[0, 1]``; a flat (or non-finite) map becomes zeros."""
    hm = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if hm.size == 0:
        return hm
    low, high = float(hm.min()), float(hm.max())
    if high - low <= 1e-12:
        return np.zeros_like(hm)
    return ((hm - low) / (high - low)).astype(np.float32)


def locate(heatmap: npt.NDArray[np.floating], letterbox: Letterbox, threshold: float = 0.5) -> HeatmapResult:
    """Map a CAM (``(h, w)``, over the square input) to the original grid and find its hottest region."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    cam = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if cam.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {cam.shape}")
    original = np.ascontiguousarray(to_original(cam, letterbox), dtype=np.float32)
    low, high, _, (peak_x, peak_y) = cv2.minMaxLoc(original)
    if high - low <= 1e-12:
        return HeatmapResult(heatmap=np.zeros_like(original), box=None, peak=None)
    # in place: (x - low) / (high - low), so the peak is exactly 1
    original -= np.float32(low)
    original *= np.float32(1.0 / (high - low))
    original[peak_y, peak_x] = 1.0
    hot = np.ascontiguousarray(original >= threshold).view(np.uint8)
    # The 8-connected hot component that holds the peak: a flood fill from the peak gives its bounding rectangle.
    _, _, _, rect = cv2.floodFill(hot, None, (int(peak_x), int(peak_y)), 128, 0, 0, 8 | cv2.FLOODFILL_FIXED_RANGE)
    x, y, w, h = (int(v) for v in rect)
    return HeatmapResult(heatmap=original, box=[x, y, x + w, y + h], peak=(int(peak_x), int(peak_y)))
