"""Random augmentation of preprocessed input tensors (numpy + OpenCV).

Augmentation is applied to the ``(H, W, C)`` tensors produced by
:func:`pacs_bridge.imaging.preprocess.preprocess`, so the network always sees
the service's preprocessing; only geometry and intensity are perturbed:
rotation, horizontal/vertical flips, a small scale change and shift (a crop
or zoom-out of a few percent), and brightness/contrast.
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

__all__ = ["AugmentConfig", "augment_batch", "augment_image", "fill_value"]


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
