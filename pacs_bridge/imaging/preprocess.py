"""The one preprocessing definition shared by the trainer and the service.

A radiograph arrives here as a 2-D ``float32`` array scaled to ``[0, 1]``
(display values: windowed, MONOCHROME2 orientation, see
:mod:`pacs_bridge.imaging.dicom`). This module turns it into the model's input
tensor, driven by the ``preprocessing`` block of the model manifest
(``models/<name>/model.json``), so that training and inference see exactly the
same tensor for the same image.

Only numpy and OpenCV are imported here; the trainer imports this module from
the installed package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "Letterbox",
    "PreprocessSpec",
    "preprocess",
    "preprocess_batch",
    "to_original",
]

FloatImage = npt.NDArray[np.float32]

_NORMALISATIONS = ("unit", "zscore", "imagenet")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects; serialised as the manifest's ``preprocessing`` block.

    ``size`` is the side of the square input; the image is resized with its
    aspect ratio kept and padded with ``pad_value`` (black) to that square.
    ``normalisation``: ``unit`` keeps ``[0, 1]``; ``zscore`` applies
    ``(x - mean) / std`` with the given scalars; ``imagenet`` applies the
    ImageNet channel statistics (3 channels only).
    ``clahe_clip`` > 0 enables CLAHE contrast enhancement with that clip limit
    on ``clahe_tiles`` x ``clahe_tiles`` tiles; ``denoise`` applies a 3x3
    median filter before resizing.
    """

    size: int = 256
    channels: int = 1
    normalisation: str = "unit"
    mean: float = 0.0
    std: float = 1.0
    clahe_clip: float = 0.0
    clahe_tiles: int = 8
    denoise: bool = False
    pad_value: float = 0.0
    interpolation: str = "area"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 2048:
            raise ValueError(f"preprocessing.size must be 16..2048, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing.channels must be 1 or 3, got {self.channels}")
        if self.normalisation not in _NORMALISATIONS:
            raise ValueError(
                f"preprocessing.normalisation must be one of {_NORMALISATIONS}, got {self.normalisation!r}"
            )
        if self.normalisation == "imagenet" and self.channels != 3:
            raise ValueError("preprocessing.normalisation 'imagenet' needs channels = 3")
        if self.std <= 0:
            raise ValueError("preprocessing.std must be > 0")
        if self.interpolation not in ("area", "linear"):
            raise ValueError("preprocessing.interpolation must be 'area' or 'linear'")

    @classmethod
    def from_manifest(cls, block: dict[str, Any]) -> PreprocessSpec:
        """Build from a manifest ``preprocessing`` block; unknown keys are refused."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = set(block) - known - {"extra"}
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        return cls(**block)

    def to_manifest(self) -> dict[str, Any]:
        """The manifest ``preprocessing`` block."""
        return asdict(self)


@dataclass(frozen=True)
class Letterbox:
    """How an original image was placed in the square model input.

    ``scale`` maps original pixels to input pixels; ``(pad_x, pad_y)`` is the
    offset of the resized image inside the square; ``shape`` is the original
    ``(rows, columns)``.
    """

    scale: float
    pad_x: int
    pad_y: int
    shape: tuple[int, int]
    size: int


def _letterbox(image: FloatImage, spec: PreprocessSpec) -> tuple[FloatImage, Letterbox]:
    rows, cols = image.shape
    scale = spec.size / max(rows, cols)
    new_rows = max(1, round(rows * scale))
    new_cols = max(1, round(cols * scale))
    shrinking = scale < 1.0
    interp = cv2.INTER_AREA if (spec.interpolation == "area" and shrinking) else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_cols, new_rows), interpolation=interp)
    canvas = np.full((spec.size, spec.size), spec.pad_value, dtype=np.float32)
    pad_y = (spec.size - new_rows) // 2
    pad_x = (spec.size - new_cols) // 2
    canvas[pad_y : pad_y + new_rows, pad_x : pad_x + new_cols] = resized
    return canvas, Letterbox(scale=scale, pad_x=pad_x, pad_y=pad_y, shape=(rows, cols), size=spec.size)


def _enhance(image: FloatImage, spec: PreprocessSpec) -> FloatImage:
    if not (spec.denoise or spec.clahe_clip > 0):
        return image
    u8 = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if spec.denoise:
        u8 = cv2.medianBlur(u8, 3)
    if spec.clahe_clip > 0:
        clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(spec.clahe_tiles, spec.clahe_tiles))
        u8 = clahe.apply(u8)
    out: FloatImage = u8.astype(np.float32) / np.float32(255.0)
    return out


def preprocess(image: npt.NDArray[Any], spec: PreprocessSpec) -> tuple[FloatImage, Letterbox]:
    """Turn a display image (2-D, values in ``[0, 1]``) into one ``(H, W, C)`` input.

    Steps, in order: optional denoise and CLAHE (on 8-bit, as OpenCV does
    them), aspect-preserving resize, padding to ``size`` x ``size``,
    replication to ``channels``, normalisation.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image too small to analyse: {image.shape[1]}x{image.shape[0]}")
    img = np.asarray(image, dtype=np.float32)
    # A decoded image is already within [0, 1]: one read to know it, instead of a clipped copy.
    low, high = cv2.minMaxLoc(img)[:2]
    if not (low >= 0.0 and high <= 1.0):
        img = np.clip(img, 0.0, 1.0)
    img = _enhance(img, spec)
    square, box = _letterbox(img, spec)
    tensor = np.repeat(square[:, :, None], spec.channels, axis=2) if spec.channels == 3 else square[:, :, None]
    if spec.normalisation == "zscore":
        tensor = (tensor - spec.mean) / spec.std
    elif spec.normalisation == "imagenet":
        tensor = (tensor - _IMAGENET_MEAN) / _IMAGENET_STD
    return np.ascontiguousarray(tensor, dtype=np.float32), box


def preprocess_batch(images: list[npt.NDArray[Any]], spec: PreprocessSpec) -> tuple[FloatImage, list[Letterbox]]:
    """Preprocess several images into one ``(N, H, W, C)`` batch."""
    tensors: list[FloatImage] = []
    boxes: list[Letterbox] = []
    for image in images:
        tensor, box = preprocess(image, spec)
        tensors.append(tensor)
        boxes.append(box)
    return np.stack(tensors, axis=0), boxes


def to_original(heatmap: npt.NDArray[Any], box: Letterbox) -> FloatImage:
    """Map a heatmap over the square input (any resolution) back to the original pixel grid."""
    hm = np.asarray(heatmap, dtype=np.float32)
    full = cv2.resize(hm, (box.size, box.size), interpolation=cv2.INTER_LINEAR)
    rows, cols = box.shape
    new_rows = max(1, round(rows * box.scale))
    new_cols = max(1, round(cols * box.scale))
    crop = full[box.pad_y : box.pad_y + new_rows, box.pad_x : box.pad_x + new_cols]
    return np.asarray(cv2.resize(crop, (cols, rows), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
