"""Pictures for the console: a radiograph as PNG, its heatmap as a coloured transparent PNG, both overlaid.

The radiograph is decoded with the one decoder of the service
(:func:`pacs_bridge.imaging.dicom.decode`: Modality and VOI LUTs of PS3.3
C.11, MONOCHROME1 inverted) and scaled down for the screen. A heatmap is the
float16 array saved per instance by the analysis stage, on the image grid or
a coarser one; it is resized to the picture it is drawn over. Boxes are not
drawn here: the page draws them in SVG on the original pixel grid.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging import dicom

__all__ = ["DisplayImage", "composite_png", "display_image", "heatmap_png", "load_heatmap", "to_png"]

LOGGER = logging.getLogger(__name__)

MAX_SIDE = 1024
"""Longest side, pixels, of a picture sent to the browser."""

_CACHE_SIZE = 32


class DisplayImage:
    """A radiograph for the screen: ``pixels`` (2-D float32 in [0, 1], scaled down) and its original size."""

    def __init__(self, pixels: npt.NDArray[np.float32], width: int, height: int) -> None:
        self.pixels = pixels
        self.width = width
        self.height = height


def shrink(image: npt.NDArray[Any], max_side: int = MAX_SIDE) -> npt.NDArray[np.float32]:
    """``image`` scaled so that its longest side is at most ``max_side`` (area averaging)."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    array = np.asarray(image, dtype=np.float32)
    if scale >= 1.0:
        return array
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(array, size, interpolation=cv2.INTER_AREA), dtype=np.float32)


_cache: OrderedDict[tuple[str, int], DisplayImage] = OrderedDict()
_cache_lock = threading.Lock()


def display_image(path: Path, *, max_pixels: int = dicom.DEFAULT_MAX_PIXELS) -> DisplayImage:
    """The stored DICOM file ``path`` decoded for the screen (cached by path and modification time).

    Raises :class:`pacs_bridge.imaging.dicom.DicomDecodeError` when it cannot be decoded.
    """
    key = (str(path), path.stat().st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    decoded = dicom.decode(path, max_pixels=max_pixels)
    image = DisplayImage(shrink(decoded.pixels), decoded.columns, decoded.rows)
    with _cache_lock:
        _cache[key] = image
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return image


def to_png(pixels: npt.NDArray[Any]) -> bytes:
    """An 8-bit grayscale PNG of a display image in [0, 1]."""
    data = np.clip(np.asarray(pixels, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", data)
    if not ok:
        raise ValueError("cannot encode PNG")
    return bytes(encoded.tobytes())


def load_heatmap(path: Path) -> npt.NDArray[np.float32]:
    """A saved heatmap (``.npy``, never pickled objects) as float32."""
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"heatmap has shape {array.shape}, expected 2-D")
    return np.nan_to_num(np.asarray(array, dtype=np.float32))


def _colour(heatmap: npt.NDArray[Any], width: int, height: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[Any]]:
    """BGR colours (JET) and alpha in [0, 1] of ``heatmap`` resized to ``width`` x ``height``."""
    values = np.asarray(heatmap, dtype=np.float32)
    peak = float(values.max()) if values.size else 0.0
    if peak > 1.0 or peak <= 0.0:
        low = float(values.min()) if values.size else 0.0
        values = (values - low) / (peak - low) if peak > low else np.zeros_like(values)
    values = np.clip(cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    colours = cv2.applyColorMap((values * 255).astype(np.uint8), cv2.COLORMAP_JET)
    # Cold regions stay transparent and warm ones fade in, so the anatomy stays readable under the overlay.
    alpha = np.clip((values - 0.3) / 0.7, 0.0, 1.0) ** 0.8
    return np.asarray(colours, dtype=np.uint8), alpha


def heatmap_png(heatmap: npt.NDArray[Any], width: int, height: int) -> bytes:
    """An RGBA PNG of ``heatmap`` at ``width`` x ``height``: JET colours, transparent where cold."""
    colours, alpha = _colour(heatmap, width, height)
    rgba = np.dstack([colours, (alpha * 255).astype(np.uint8)])
    ok, encoded = cv2.imencode(".png", rgba)
    if not ok:
        raise ValueError("cannot encode PNG")
    return bytes(encoded.tobytes())


def composite_png(
    pixels: npt.NDArray[Any],
    heatmap: npt.NDArray[Any] | None,
    boxes: list[list[float]],
    original_size: tuple[int, int],
    *,
    opacity: float = 0.45,
) -> bytes:
    """The radiograph with the heatmap blended in and boxes drawn (for the printable report), as PNG."""
    height, width = pixels.shape[:2]
    gray = np.clip(np.asarray(pixels, dtype=np.float32) * 255.0, 0, 255).astype(np.uint8)
    picture = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR).astype(np.float32)
    if heatmap is not None:
        colours, alpha = _colour(heatmap, width, height)
        weight = (alpha * opacity)[..., None]
        picture = picture * (1.0 - weight) + colours.astype(np.float32) * weight
    out = np.clip(picture, 0, 255).astype(np.uint8)
    sx, sy = width / max(original_size[0], 1), height / max(original_size[1], 1)
    thickness = max(2, round(max(width, height) / 300))
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(out, (round(x0 * sx), round(y0 * sy)), (round(x1 * sx), round(y1 * sy)), (0, 255, 255), thickness)
    ok, encoded = cv2.imencode(".png", out)
    if not ok:
        raise ValueError("cannot encode PNG")
    return bytes(encoded.tobytes())
