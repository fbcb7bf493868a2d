"""Read any supported image file (DICOM, PNG, JPEG) as a display image.

A display image is a 2-D ``float32`` array in ``[0, 1]`` where bright means
dense (bone), the input contract of :mod:`pacs_bridge.imaging.preprocess`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["ImageReadError", "load_display_image"]

_RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}


class ImageReadError(ValueError):
    """The file cannot be read as an image; the message names the file and the reason."""


def _load_raster(path: Path) -> npt.NDArray[np.float32]:
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(f"{path}: not a readable PNG or JPEG image")
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        else:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    maximum = 65535.0 if image.dtype == np.uint16 else 255.0
    return (image.astype(np.float32) / maximum).astype(np.float32)


def load_display_image(path: Path) -> npt.NDArray[np.float32]:
    """Load ``path`` (DICOM, PNG or JPEG) as a 2-D display image in ``[0, 1]``."""
    path = Path(path)
    if path.suffix.lower() in _RASTER_SUFFIXES:
        return _load_raster(path)
    from pacs_bridge.imaging import dicom

    return dicom.load_display_image(path)
