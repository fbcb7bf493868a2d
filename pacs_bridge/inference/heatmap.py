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
    cam = np.asarray(heatmap, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {cam.shape}")
    original = normalise(to_original(cam, letterbox))
    if not original.any():
        return HeatmapResult(heatmap=original, box=None, peak=None)
    flat_index = int(np.argmax(original))
    peak_y, peak_x = divmod(flat_index, original.shape[1])
    hot = (original >= threshold * float(original[peak_y, peak_x])).astype(np.uint8)
    _, labels = cv2.connectedComponents(hot, connectivity=8)
    region = labels == labels[peak_y, peak_x]
    ys = np.flatnonzero(region.any(axis=1))
    xs = np.flatnonzero(region.any(axis=0))
    box = [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]
    return HeatmapResult(heatmap=original, box=box, peak=(int(peak_x), int(peak_y)))
