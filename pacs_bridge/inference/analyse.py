"""Analyse radiographs: decode, preprocess, run the model in batches, locate the finding.

:class:`Analyser` wraps a loaded :class:`~pacs_bridge.inference.model.FractureModel`.
:meth:`Analyser.analyse_paths` is what the worker calls on the files of a
settled study: each file is decoded (DICOM via :mod:`pacs_bridge.imaging.dicom`,
PNG/JPEG via :mod:`pacs_bridge.imaging.loader`); a file that cannot be read
becomes an :class:`ImageFailure` with the reason, the others are preprocessed
and run through the model ``batch_size`` at a time, in input order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging import dicom
from pacs_bridge.imaging.loader import ImageReadError
from pacs_bridge.imaging.loader import load_display_image as load_raster_or_dicom
from pacs_bridge.imaging.preprocess import Letterbox, preprocess
from pacs_bridge.inference.heatmap import locate
from pacs_bridge.inference.model import FractureModel

__all__ = ["Analyser", "ImageFailure", "ImageFinding", "load_image"]

LOGGER = logging.getLogger(__name__)

_RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class ImageFinding:
    """The model's result for one image.

    ``box`` (``[x0, y0, x1, y1]``, ``x1``/``y1`` exclusive), ``peak``
    (``(x, y)``) and ``heatmap`` (``float32`` in ``[0, 1]``) are on the
    original pixel grid; they are ``None`` when the model has no heatmap
    output. ``timings`` holds ``decode_ms``, ``preprocess_ms`` and
    ``infer_ms`` (the batch's inference time divided by its size).
    """

    path: str
    probability: float
    fracture: bool
    threshold: float
    body_part: str | None
    box: list[int] | None
    peak: tuple[int, int] | None
    heatmap: npt.NDArray[np.float32] | None
    model_name: str
    model_version: str
    provider: str
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``pacs-bridge infer --json`` record (no heatmap)."""
        return {
            "path": self.path,
            "probability": round(float(self.probability), 6),
            "fracture": bool(self.fracture),
            "threshold": float(self.threshold),
            "body_part": self.body_part,
            "box": list(self.box) if self.box is not None else None,
            "model": {"name": self.model_name, "version": self.model_version},
        }


@dataclass
class ImageFailure:
    """An input that could not be analysed, and why."""

    path: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        """The ``pacs-bridge infer --json`` record of a failure."""
        return {"path": self.path, "error": self.reason}


def load_image(path: str | PathLike[str], *, max_pixels: int = dicom.DEFAULT_MAX_PIXELS) -> npt.NDArray[np.float32]:
    """Decode one file (DICOM, PNG or JPEG) as a display image; raises :class:`ImageReadError`."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.suffix.lower() in _RASTER_SUFFIXES:
        return load_raster_or_dicom(path)
    return dicom.load_display_image(path, max_pixels=max_pixels)


class Analyser:
    """Runs a :class:`FractureModel` over images, ``batch_size`` at a time.

    ``heatmap_threshold`` is the fraction of the heatmap's peak that bounds the
    hottest region; ``keep_heatmap=False`` drops the full-resolution map from
    the findings (the box and peak are still computed).
    """

    def __init__(
        self,
        model: FractureModel,
        batch_size: int = 8,
        *,
        max_pixels: int = dicom.DEFAULT_MAX_PIXELS,
        heatmap_threshold: float = 0.5,
        keep_heatmap: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.heatmap_threshold = heatmap_threshold
        self.keep_heatmap = keep_heatmap

    def analyse_images(self, items: Sequence[tuple[str, npt.NDArray[Any]]]) -> list[ImageFinding]:
        """Analyse display images (2-D, ``[0, 1]``) given as ``(key, image)``; one finding each, in order.

        Raises ``ValueError`` for an image that cannot be preprocessed (not 2-D, too small).
        """
        findings: list[ImageFinding] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            findings.extend(self._run(list(chunk), [0.0] * len(chunk)))
        return findings

    def analyse_paths(self, paths: Sequence[str | PathLike[str]]) -> list[ImageFinding | ImageFailure]:
        """Decode and analyse files; unreadable ones become :class:`ImageFailure`. Order is kept."""
        results: list[ImageFinding | ImageFailure | None] = [None] * len(paths)
        pending: list[tuple[int, str, npt.NDArray[np.float32], float]] = []

        def flush() -> None:
            if not pending:
                return
            items = [(key, image) for _, key, image, _ in pending]
            decode_ms = [ms for _, _, _, ms in pending]
            for (index, _, _, _), finding in zip(pending, self._run(items, decode_ms), strict=True):
                results[index] = finding
            pending.clear()

        for index, raw_path in enumerate(paths):
            key = str(raw_path)
            started = time.perf_counter()
            try:
                image = load_image(raw_path, max_pixels=self.max_pixels)
                _check_display(image, key)
            except ImageReadError as exc:
                results[index] = ImageFailure(key, str(exc))
                continue
            except MemoryError:
                results[index] = ImageFailure(key, f"{key}: not enough memory to decode the image")
                continue
            except Exception as exc:
                LOGGER.exception("unexpected error decoding %s", key)
                results[index] = ImageFailure(key, f"{key}: cannot decode ({type(exc).__name__}: {exc})")
                continue
            pending.append((index, key, image, (time.perf_counter() - started) * 1000.0))
            if len(pending) >= self.batch_size:
                flush()
        flush()
        return [r for r in results if r is not None]

    def _run(self, items: list[tuple[str, npt.NDArray[Any]]], decode_ms: list[float]) -> list[ImageFinding]:
        """Preprocess, predict and post-process one batch."""
        spec = self.model.manifest.preprocessing
        tensors: list[npt.NDArray[np.float32]] = []
        letterboxes: list[Letterbox] = []
        prep_ms: list[float] = []
        for key, image in items:
            started = time.perf_counter()
            try:
                tensor, letterbox = preprocess(image, spec)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from exc
            prep_ms.append((time.perf_counter() - started) * 1000.0)
            tensors.append(tensor)
            letterboxes.append(letterbox)
        started = time.perf_counter()
        outputs = self.model.predict(np.stack(tensors, axis=0))
        infer_ms = (time.perf_counter() - started) * 1000.0 / len(items)
        manifest = self.model.manifest
        findings: list[ImageFinding] = []
        for i, (key, _) in enumerate(items):
            probability = float(np.clip(outputs["probability"][i], 0.0, 1.0))
            body_part: str | None = None
            if "body_part" in outputs and manifest.body_parts:
                scores = outputs["body_part"][i]
                best = int(np.argmax(scores))
                body_part = manifest.body_parts[best] if best < len(manifest.body_parts) else None
            box: list[int] | None = None
            peak: tuple[int, int] | None = None
            heatmap: npt.NDArray[np.float32] | None = None
            post_started = time.perf_counter()
            if "heatmap" in outputs:
                located = locate(outputs["heatmap"][i], letterboxes[i], self.heatmap_threshold)
                box, peak = located.box, located.peak
                heatmap = located.heatmap if self.keep_heatmap else None
            findings.append(
                ImageFinding(
                    path=key,
                    probability=probability,
                    fracture=probability >= manifest.threshold,
                    threshold=manifest.threshold,
                    body_part=body_part,
                    box=box,
                    peak=peak,
                    heatmap=heatmap,
                    model_name=manifest.name,
                    model_version=manifest.version,
                    provider=self.model.provider,
                    timings={
                        "decode_ms": decode_ms[i],
                        "preprocess_ms": prep_ms[i],
                        "infer_ms": infer_ms,
                        "postprocess_ms": (time.perf_counter() - post_started) * 1000.0,
                    },
                )
            )
        return findings


def _check_display(image: npt.NDArray[Any], key: str) -> None:
    """Refuse decoded images that the preprocessing cannot take (so they fail alone, not the batch)."""
    if image.ndim != 2:
        raise ImageReadError(f"{key}: expected a 2-D grayscale image, got shape {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ImageReadError(f"{key}: image too small to analyse ({image.shape[1]}x{image.shape[0]})")
