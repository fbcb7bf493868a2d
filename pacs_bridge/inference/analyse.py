"""Analyse radiographs: decode, preprocess, run the model in batches, locate the finding.

:class:`Analyser` wraps a loaded :class:`~pacs_bridge.inference.model.FractureModel`.
:meth:`Analyser.analyse_paths` is what the worker calls on the files of a
settled study: each file is decoded (DICOM via :mod:`pacs_bridge.imaging.dicom`,
PNG/JPEG via :mod:`pacs_bridge.imaging.loader`); a file that cannot be read
becomes an :class:`ImageFailure` with the reason, the others are preprocessed
and run through the model ``batch_size`` at a time, in input order.

Failures stay with their image. Images that cannot be radiographs are refused
(:mod:`pacs_bridge.inference.plausibility`). Any exception while decoding,
preprocessing or post-processing one image (including the
``pyo3_runtime.PanicException`` of Rust-based decoders, which derives from
``BaseException``) fails that image alone; only ``KeyboardInterrupt`` and
``SystemExit`` propagate. When ONNX Runtime fails on a batch, the batch is run
again image by image so that one bad input fails alone.

Localisation depends on the manifest's ``outputs.heatmap_kind``: a ``cam``
(1.x models) gives one box, the hottest region above ``box_threshold`` x its
peak (:func:`pacs_bridge.inference.heatmap.locate`); a ``centre`` map (2.x)
gives up to ``localisation.max_boxes`` scored boxes from its peaks
(:func:`pacs_bridge.inference.boxes.centre_boxes`), none when no cell reaches
``localisation.min_score``; with ``localisation.flagged_min_score`` the boxes
follow the call (a flagged image always shows its strongest peak, an image
below the threshold none). :func:`analyser_from_settings` builds the analyser
from the one settings object (:func:`pacs_bridge.config.load_settings`), for
``pacs-bridge serve`` and ``pacs-bridge infer`` alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging import dicom
from pacs_bridge.imaging.loader import ImageReadError
from pacs_bridge.imaging.loader import load_display_image as load_raster_or_dicom
from pacs_bridge.imaging.preprocess import Letterbox, preprocess, to_original
from pacs_bridge.inference.boxes import centre_boxes
from pacs_bridge.inference.heatmap import locate
from pacs_bridge.inference.model import FractureModel, default_model_dir, load_model
from pacs_bridge.inference.plausibility import implausible_reason

if TYPE_CHECKING:
    from pacs_bridge.config import Settings

__all__ = ["Analyser", "ImageFailure", "ImageFinding", "analyser_from_settings", "load_image"]

ScoredBox = tuple[tuple[int, int, int, int], float]

LOGGER = logging.getLogger(__name__)

_RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class ImageFinding:
    """The model's result for one image.

    ``box`` (``[x0, y0, x1, y1]``, ``x1``/``y1`` exclusive), ``peak``
    (``(x, y)``) and ``heatmap`` (``float32`` in ``[0, 1]``, relative to its
    peak; all zero when a ``centre`` model points nowhere) are on the
    original pixel grid; they are ``None`` when the model has no heatmap
    output or points nowhere. ``boxes`` lists every box with its score, best
    first (``box`` is the first of them). ``timings`` holds ``decode_ms``, ``preprocess_ms`` and
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
    boxes: list[ScoredBox] = field(default_factory=list)
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
            "boxes": [{"box": list(box), "score": round(float(score), 6)} for box, score in self.boxes],
            "peak": list(self.peak) if self.peak is not None else None,
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


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fatal(exc: BaseException) -> bool:
    """Only a user's interrupt and an exit request leave the per-image isolation."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit))


class Analyser:
    """Runs a :class:`FractureModel` over images, ``batch_size`` at a time.

    ``heatmap_threshold`` (``[analysis] box_threshold``) is the share of the
    peak that bounds the box of a ``cam`` heatmap; ``centre`` heatmaps read
    their boxes with the manifest's ``localisation`` block.
    ``keep_heatmap=False`` drops the full-resolution map from the findings
    (boxes and peak are still computed). ``check_plausible=False`` skips the
    radiograph plausibility check (benchmarks on synthetic input only).
    """

    def __init__(
        self,
        model: FractureModel,
        batch_size: int = 8,
        *,
        max_pixels: int = dicom.DEFAULT_MAX_PIXELS,
        heatmap_threshold: float = 0.7,
        keep_heatmap: bool = True,
        check_plausible: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0.0 < heatmap_threshold <= 1.0:
            raise ValueError("heatmap_threshold must be in (0, 1]")
        self.model = model
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.heatmap_threshold = heatmap_threshold
        self.keep_heatmap = keep_heatmap
        self.check_plausible = check_plausible

    def analyse_images(self, items: Sequence[tuple[str, npt.NDArray[Any]]]) -> list[ImageFinding | ImageFailure]:
        """Analyse display images (2-D, ``[0, 1]``) given as ``(key, image)``; one result each, in order."""
        results: list[ImageFinding | ImageFailure] = []
        for start in range(0, len(items), self.batch_size):
            chunk = [(key, image, 0.0) for key, image in items[start : start + self.batch_size]]
            results.extend(self._run(chunk))
        return results

    def analyse_paths(self, paths: Sequence[str | PathLike[str]]) -> list[ImageFinding | ImageFailure]:
        """Decode and analyse files; unreadable or implausible ones become :class:`ImageFailure`. Order is kept."""
        results: list[ImageFinding | ImageFailure | None] = [None] * len(paths)
        pending: list[tuple[int, str, npt.NDArray[Any], float]] = []

        def flush() -> None:
            if not pending:
                return
            done = self._run([(key, image, ms) for _, key, image, ms in pending])
            for (index, _, _, _), result in zip(pending, done, strict=True):
                results[index] = result
            pending.clear()

        for index, raw_path in enumerate(paths):
            key = str(raw_path)
            started = time.perf_counter()
            try:
                image = load_image(raw_path, max_pixels=self.max_pixels)
            except ImageReadError as exc:
                results[index] = ImageFailure(key, str(exc))
                continue
            except MemoryError:
                results[index] = ImageFailure(key, f"{key}: not enough memory to decode the image")
                continue
            except BaseException as exc:
                if _fatal(exc):
                    raise
                LOGGER.warning("unexpected error decoding %s", key, exc_info=True)
                results[index] = ImageFailure(key, f"{key}: cannot decode ({_describe(exc)})")
                continue
            pending.append((index, key, image, (time.perf_counter() - started) * 1000.0))
            if len(pending) >= self.batch_size:
                flush()
        flush()
        return [r for r in results if r is not None]

    def _run(self, items: list[tuple[str, npt.NDArray[Any], float]]) -> list[ImageFinding | ImageFailure]:
        """Check, preprocess, predict and post-process one batch; failures stay with their image."""
        spec = self.model.manifest.preprocessing
        results: list[ImageFinding | ImageFailure | None] = [None] * len(items)
        ready: list[tuple[int, npt.NDArray[np.float32], Letterbox, float]] = []
        for i, (key, image, _) in enumerate(items):
            started = time.perf_counter()
            try:
                reason = _check_display(image) if not self.check_plausible else implausible_reason(image)
                if reason is not None:
                    results[i] = ImageFailure(key, f"{key}: {reason}")
                    continue
                tensor, letterbox = preprocess(image, spec)
            except BaseException as exc:
                if _fatal(exc):
                    raise
                results[i] = ImageFailure(key, f"{key}: cannot preprocess ({_describe(exc)})")
                continue
            ready.append((i, tensor, letterbox, (time.perf_counter() - started) * 1000.0))
        for i, result in self._predict(items, ready):
            results[i] = result
        return [r for r in results if r is not None]

    def _predict(
        self,
        items: list[tuple[str, npt.NDArray[Any], float]],
        ready: list[tuple[int, npt.NDArray[np.float32], Letterbox, float]],
    ) -> list[tuple[int, ImageFinding | ImageFailure]]:
        if not ready:
            return []
        started = time.perf_counter()
        try:
            outputs = self.model.predict(np.stack([tensor for _, tensor, _, _ in ready], axis=0))
        except BaseException as exc:
            if _fatal(exc):
                raise
            if len(ready) > 1:
                LOGGER.warning("inference failed on a batch of %d (%s); retrying image by image", len(ready), exc)
                return [pair for one in ready for pair in self._predict(items, [one])]
            i = ready[0][0]
            key = items[i][0]
            return [(i, ImageFailure(key, f"{key}: inference failed ({_describe(exc)})"))]
        infer_ms = (time.perf_counter() - started) * 1000.0 / len(ready)
        done: list[tuple[int, ImageFinding | ImageFailure]] = []
        for row, (i, _, letterbox, prep_ms) in enumerate(ready):
            key, _, decode_ms = items[i]
            try:
                finding = self._finding(key, outputs, row, letterbox)
            except BaseException as exc:
                if _fatal(exc):
                    raise
                done.append((i, ImageFailure(key, f"{key}: cannot read the model output ({_describe(exc)})")))
                continue
            finding.timings = {
                "decode_ms": decode_ms,
                "preprocess_ms": prep_ms,
                "infer_ms": infer_ms,
                **finding.timings,
            }
            done.append((i, finding))
        return done

    def _finding(
        self, key: str, outputs: dict[str, npt.NDArray[np.float32]], row: int, letterbox: Letterbox
    ) -> ImageFinding:
        manifest = self.model.manifest
        started = time.perf_counter()
        probability = float(np.clip(outputs["probability"][row], 0.0, 1.0))
        if not np.isfinite(probability):
            raise ValueError("the model returned a non-finite probability")
        flagged = probability >= manifest.threshold
        body_part: str | None = None
        if "body_part" in outputs and manifest.body_parts:
            best = int(np.argmax(outputs["body_part"][row]))
            body_part = manifest.body_parts[best] if best < len(manifest.body_parts) else None
        box: list[int] | None = None
        peak: tuple[int, int] | None = None
        heatmap: npt.NDArray[np.float32] | None = None
        boxes: list[ScoredBox] = []
        if "heatmap" in outputs:
            raw = outputs["heatmap"][row]
            if manifest.outputs.heatmap_kind == "centre":
                found = centre_boxes(raw, letterbox, manifest.localisation, flagged=flagged)
                boxes, peak = found.boxes, found.peak
                box = list(boxes[0][0]) if boxes else None
                if self.keep_heatmap:
                    # Shown relative to the top peak, so the hot region is the top box's own half-maximum area;
                    # a map with no peak at min_score shows nothing (no heat over empty background).
                    if boxes:
                        grid = np.asarray(raw, dtype=np.float32)
                        heatmap = to_original(np.clip(grid / np.float32(boxes[0][1]), 0.0, 1.0), letterbox)
                    else:
                        heatmap = np.zeros(letterbox.shape, dtype=np.float32)  # nothing to map back
            else:
                located = locate(raw, letterbox, self.heatmap_threshold)
                box, peak = located.box, located.peak
                if box is not None:
                    boxes = [((box[0], box[1], box[2], box[3]), probability)]
                heatmap = located.heatmap if self.keep_heatmap else None
        return ImageFinding(
            path=key,
            probability=probability,
            fracture=flagged,
            threshold=manifest.threshold,
            body_part=body_part,
            box=box,
            peak=peak,
            heatmap=heatmap,
            model_name=manifest.name,
            model_version=manifest.version,
            provider=self.model.provider,
            boxes=boxes,
            timings={"postprocess_ms": (time.perf_counter() - started) * 1000.0},
        )


def _check_display(image: npt.NDArray[Any]) -> str | None:
    """The preprocessing's own minimum (used when the plausibility check is off)."""
    if image.ndim != 2:
        return f"expected a 2-D grayscale image, got shape {image.shape}"
    if image.shape[0] < 8 or image.shape[1] < 8:
        return f"image too small to analyse ({image.shape[1]}x{image.shape[0]})"
    return None


def analyser_from_settings(
    settings: Settings, *, model_dir: str | PathLike[str] | None = None, keep_heatmap: bool = True
) -> Analyser:
    """Load the model named by ``settings.analysis`` (or ``model_dir``) and wrap it in an :class:`Analyser`.

    Everything comes from ``[analysis]``: ``model_dir`` (default: the bundled
    model), ``providers``, ``intra_op_threads``, ``batch_size``, ``max_pixels``
    and ``box_threshold``. Raises :class:`~pacs_bridge.inference.manifest.ManifestError`
    when the model cannot be loaded.
    """
    analysis = settings.analysis
    folder = Path(model_dir) if model_dir is not None else (analysis.model_dir or default_model_dir())
    model = load_model(folder, providers=analysis.providers, intra_op_threads=analysis.intra_op_threads)
    return Analyser(
        model,
        batch_size=analysis.batch_size,
        max_pixels=analysis.max_pixels,
        heatmap_threshold=analysis.box_threshold,
        keep_heatmap=keep_heatmap,
    )
