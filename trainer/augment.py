"""Random augmentation of preprocessed input tensors (numpy + OpenCV).

Augmentation is applied to the ``(H, W, C)`` tensors produced by
:func:`pacs_bridge.imaging.preprocess.preprocess`, so the network always sees
the service's preprocessing; only geometry and intensity are perturbed:
rotation, horizontal/vertical flips, a small scale change and shift (a crop
or zoom-out of a few percent), and brightness/contrast.

:func:`augment_with_boxes` (used for the ``heatnet``) moves the fracture boxes
with the image (same affine matrix, boxes re-fitted around the moved
corners), may zoom into a crop that keeps every box, and adds
radiograph-style intensity changes: gamma, contrast, Gaussian noise and JPEG
re-compression at a random quality.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.preprocess import PreprocessSpec

LOGGER = logging.getLogger(__name__)

__all__ = ["AugmentConfig", "RadiographAugment", "augment_batch", "augment_image", "augment_with_boxes", "fill_value"]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random perturbations (0 disables one)."""

    rotation_deg: float = 15.0
    hflip: float = 0.5
    vflip: float = 0.1
    scale: float = 0.10
    shift: float = 0.05
    brightness: float = 0.08
    contrast: float = 0.15


def fill_value(spec: PreprocessSpec) -> float:
    """The tensor value of the letterbox padding after normalisation (for exposed borders)."""
    if spec.normalisation == "zscore":
        return (spec.pad_value - spec.mean) / spec.std
    if spec.normalisation == "imagenet":
        return 0.0
    return spec.pad_value


def augment_image(
    image: npt.NDArray[np.float32],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    fill: float = 0.0,
    clip: tuple[float, float] | None = None,
) -> npt.NDArray[np.float32]:
    """Return a randomly perturbed copy of one ``(H, W, C)`` tensor."""
    rows, cols, channels = image.shape
    out = image
    if rng.random() < cfg.hflip:
        out = out[:, ::-1, :]
    if rng.random() < cfg.vflip:
        out = out[::-1, :, :]
    angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg) if cfg.rotation_deg else 0.0
    scale = math.exp(rng.uniform(-cfg.scale, cfg.scale)) if cfg.scale else 1.0
    dx = rng.uniform(-cfg.shift, cfg.shift) * cols if cfg.shift else 0.0
    dy = rng.uniform(-cfg.shift, cfg.shift) * rows if cfg.shift else 0.0
    if angle or scale != 1.0 or dx or dy:
        matrix = cv2.getRotationMatrix2D((cols / 2.0, rows / 2.0), angle, scale)
        matrix[0, 2] += dx
        matrix[1, 2] += dy
        warped = cv2.warpAffine(
            np.ascontiguousarray(out),
            matrix,
            (cols, rows),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(fill, fill, fill, fill),
        )
        out = np.asarray(warped, dtype=np.float32).reshape(rows, cols, channels)
    out = np.array(out, dtype=np.float32, copy=True)
    if cfg.contrast or cfg.brightness:
        gain = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
        bias = rng.uniform(-cfg.brightness, cfg.brightness)
        centre = float(out.mean())
        out = (out - centre) * gain + centre + bias
    if clip is not None:
        out = np.clip(out, clip[0], clip[1])
    return out.astype(np.float32, copy=False)


def augment_batch(
    images: npt.NDArray[np.float32],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    fill: float = 0.0,
    clip: tuple[float, float] | None = None,
) -> npt.NDArray[np.float32]:
    """Augment every image of an ``(N, H, W, C)`` batch independently."""
    return np.stack([augment_image(img, rng, cfg, fill, clip) for img in images], axis=0)


@dataclass(frozen=True)
class RadiographAugment:
    """Ranges of the box-aware augmentation (0 disables one)."""

    rotation_deg: float = 12.0
    hflip: float = 0.5
    vflip: float = 0.1
    scale: float = 0.15
    shift: float = 0.06
    crop: float = 0.3
    crop_max_zoom: float = 1.6
    gamma: float = 0.3
    contrast: float = 0.2
    brightness: float = 0.06
    noise: float = 0.3
    noise_sigma: float = 0.03
    jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 90)


Boxes = npt.NDArray[np.float32]


def _crop_matrix(size: int, boxes: Boxes, rng: np.random.Generator, max_zoom: float) -> npt.NDArray[np.float64]:
    """An affine zoom into a random square window that still holds every box."""
    zoom = rng.uniform(1.0, max_zoom)
    side = size / zoom
    if len(boxes):
        need_x0, need_y0 = float(boxes[:, 0].min()), float(boxes[:, 1].min())
        need_x1, need_y1 = float(boxes[:, 2].max()), float(boxes[:, 3].max())
        side = max(side, need_x1 - need_x0 + 4, need_y1 - need_y0 + 4)
        side = min(side, float(size))
        lo_x, hi_x = max(0.0, need_x1 + 2 - side), min(need_x0 - 2, size - side)
        lo_y, hi_y = max(0.0, need_y1 + 2 - side), min(need_y0 - 2, size - side)
    else:
        lo_x, hi_x, lo_y, hi_y = 0.0, size - side, 0.0, size - side
    x0 = rng.uniform(lo_x, hi_x) if hi_x > lo_x else max(0.0, min(lo_x, size - side))
    y0 = rng.uniform(lo_y, hi_y) if hi_y > lo_y else max(0.0, min(lo_y, size - side))
    k = size / side
    return np.array([[k, 0.0, -k * x0], [0.0, k, -k * y0]], dtype=np.float64)


def _move_boxes(boxes: Boxes, matrix: npt.NDArray[np.float64], size: int) -> Boxes:
    """Apply a 2 x 3 affine matrix to boxes; keep those whose centre stays on the image."""
    if not len(boxes):
        return boxes
    corners = np.stack(
        [
            boxes[:, [0, 1]],
            boxes[:, [2, 1]],
            boxes[:, [0, 3]],
            boxes[:, [2, 3]],
        ],
        axis=1,
    ).astype(np.float64)
    moved = corners @ matrix[:, :2].T + matrix[:, 2]
    out = np.concatenate([moved.min(axis=1), moved.max(axis=1)], axis=1)
    centre = (out[:, :2] + out[:, 2:]) / 2.0
    keep = (centre >= 0).all(axis=1) & (centre < size).all(axis=1)
    fitted: Boxes = np.clip(out[keep], 0, size).astype(np.float32)
    return fitted


def augment_with_boxes(
    image: npt.NDArray[np.float32],
    boxes: Boxes,
    rng: np.random.Generator,
    cfg: RadiographAugment,
    fill: float = 0.0,
) -> tuple[npt.NDArray[np.float32], Boxes]:
    """Randomly perturb one ``(S, S, C)`` unit-range tensor and its boxes (``[x0, y0, x1, y1]`` in tensor pixels)."""
    size = image.shape[0]
    channels = image.shape[2]
    out = np.ascontiguousarray(image[:, :, 0], dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    matrix = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float64)
    if rng.random() < cfg.hflip:
        matrix = np.array([[-1.0, 0.0, size], [0.0, 1.0, 0.0]]) @ np.vstack([matrix, [0, 0, 1]])
    if rng.random() < cfg.vflip:
        matrix = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, size]]) @ np.vstack([matrix, [0, 0, 1]])
    if cfg.crop and rng.random() < cfg.crop:
        flipped = _move_boxes(boxes, matrix, size) if len(boxes) else boxes
        crop = _crop_matrix(size, flipped, rng, cfg.crop_max_zoom)
        matrix = crop @ np.vstack([matrix, [0, 0, 1]])
    angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg) if cfg.rotation_deg else 0.0
    scale = math.exp(rng.uniform(-cfg.scale, cfg.scale)) if cfg.scale else 1.0
    rot = cv2.getRotationMatrix2D((size / 2.0, size / 2.0), angle, scale)
    rot[0, 2] += rng.uniform(-cfg.shift, cfg.shift) * size
    rot[1, 2] += rng.uniform(-cfg.shift, cfg.shift) * size
    matrix = rot @ np.vstack([matrix, [0, 0, 1]])
    out = np.asarray(
        cv2.warpAffine(
            out, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
        ),
        dtype=np.float32,
    )
    moved = _move_boxes(boxes, matrix, size)
    if cfg.gamma:
        out = np.power(np.clip(out, 0.0, 1.0), math.exp(rng.uniform(-cfg.gamma, cfg.gamma)))
    if cfg.contrast or cfg.brightness:
        gain = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
        centre = float(out.mean())
        out = (out - centre) * gain + centre + rng.uniform(-cfg.brightness, cfg.brightness)
    if cfg.noise and rng.random() < cfg.noise:
        out = out + rng.normal(0.0, rng.uniform(0.2, 1.0) * cfg.noise_sigma, out.shape).astype(np.float32)
    out = np.clip(out, 0.0, 1.0)
    if cfg.jpeg and rng.random() < cfg.jpeg:
        quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        ok, encoded = cv2.imencode(".jpg", (out * 255.0 + 0.5).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
        decoded = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE) if ok else None
        if decoded is not None:
            out = decoded.astype(np.float32) / np.float32(255.0)
    result = np.repeat(out[:, :, None], channels, axis=2) if channels > 1 else out[:, :, None]
    return np.ascontiguousarray(result, dtype=np.float32), moved
