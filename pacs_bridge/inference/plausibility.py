"""Refuse inputs that cannot be radiographs before the model scores them.

A CNN gives a confident score to anything; a 64 x 64 patch of noise would be
reported as a fracture of the hip. :func:`implausible_reason` looks at the
display image (2-D, ``[0, 1]``, PS3.3 C.7.6.3 pixel data after the
PS3.3 C.11 LUTs) and returns why it is refused, or ``None``:

* **too small**: the shorter side is under :data:`MIN_SIDE` pixels (128);
  a projection radiograph is at least several hundred pixels on a side;
* **near-constant**: the standard deviation of the grey levels is under
  :data:`MIN_STD` (0.01 of the display range): a blank or flat frame;
* **noise-like**: the *neighbour correlation* ``rho = 1 - mean(d^2) / (2 var)``
  (``d`` the differences between horizontally and vertically adjacent samples,
  ``var`` the grey-level variance; ``rho`` is the lag-1 autocorrelation),
  measured on every ``k``-th pixel in both directions (``k`` = shorter side //
  256, at least 1, so about 256 samples across: cheap on a 10-megapixel
  image), is under :data:`MIN_NEIGHBOUR_CORRELATION` (0.5). Anatomy is smooth
  at that scale (``rho`` above 0.85 on every FracAtlas radiograph), independent
  noise gives ``rho`` near 0.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MIN_NEIGHBOUR_CORRELATION", "MIN_SIDE", "MIN_STD", "implausible_reason", "neighbour_correlation"]

LOGGER = logging.getLogger(__name__)

MIN_SIDE = 128
MIN_STD = 0.01
MIN_NEIGHBOUR_CORRELATION = 0.5
_MEASURE_SIDE = 256


def neighbour_correlation(image: npt.NDArray[Any]) -> tuple[float, float]:
    """``(std, rho)`` of a 2-D image, on every ``k``-th pixel (see the module docstring)."""
    img = np.asarray(image)
    step = max(1, min(img.shape) // _MEASURE_SIDE)
    sample = np.asarray(img[::step, ::step], dtype=np.float32)
    var = float(sample.var())
    std = float(np.sqrt(var))
    if var <= 0.0:
        return std, 1.0
    dx = np.diff(sample, axis=1)
    dy = np.diff(sample, axis=0)
    mean_sq = (float(np.mean(dx * dx)) + float(np.mean(dy * dy))) / 2.0
    return std, 1.0 - mean_sq / (2.0 * var)


def implausible_reason(image: npt.NDArray[Any]) -> str | None:
    """Why ``image`` cannot be a radiograph, or ``None`` when it may be one."""
    if image.ndim != 2:
        return f"expected a 2-D grayscale image, got shape {image.shape}"
    rows, cols = image.shape
    if min(rows, cols) < MIN_SIDE:
        return f"image too small to be a radiograph ({cols}x{rows}; the shorter side must be >= {MIN_SIDE} px)"
    std, rho = neighbour_correlation(image)
    if std < MIN_STD:
        return f"image is near-constant (grey-level standard deviation {std:.4f} < {MIN_STD}); not a radiograph"
    if rho < MIN_NEIGHBOUR_CORRELATION:
        return (
            f"image looks like noise (neighbour correlation {rho:.2f} < {MIN_NEIGHBOUR_CORRELATION}); not a radiograph"
        )
    return None
