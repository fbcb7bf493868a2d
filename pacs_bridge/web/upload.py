"""Analyse a file dropped on the console: DICOM (PS3.10), PNG or JPEG, in memory, nothing kept.

The upload is recognised by its content (the ``DICM`` prefix of PS3.10 7.1,
the PNG and JPEG signatures), not by its name; it is written to a private
temporary file (mode 0600) only for the decoder, which is removed at once;
the model runs through :meth:`pacs_bridge.inference.analyse.Analyser.analyse_images`
as for stored studies. The result (finding, pictures, and the DICOM bytes for
"store as a study") stays in this process's memory for
:data:`KEEP_SECONDS`, for its owner only, so that the page can show the
heatmap and build the report; then it is forgotten.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.loader import ImageReadError
from pacs_bridge.web.images import heatmap_png, shrink, to_png

__all__ = ["KEEP_SECONDS", "UploadError", "UploadResult", "UploadStore", "analyse_upload", "sniff"]

LOGGER = logging.getLogger(__name__)

KEEP_SECONDS = 30 * 60
_MAX_ENTRIES = 64
_MAX_BYTES = 512 * 1024 * 1024


class UploadError(ValueError):
    """The upload cannot be analysed; the message is for the user."""


def sniff(data: bytes) -> str | None:
    """``"dicom"``, ``"png"``, ``"jpeg"`` or None, from the file's first bytes."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


@dataclass
class UploadResult:
    """One analysed upload, kept in memory for a while."""

    id: str
    owner: str
    name: str
    kind: str
    width: int
    height: int
    finding: dict[str, Any]
    image_png: bytes
    heatmap_png: bytes | None
    pixels: npt.NDArray[np.float32]
    heatmap: npt.NDArray[np.float32] | None
    dicom: bytes | None = None
    created: float = field(default_factory=time.monotonic)
    analysed_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    stored_study_uid: str | None = None

    @property
    def size(self) -> int:
        """Bytes held in memory."""
        return len(self.image_png) + len(self.heatmap_png or b"") + len(self.dicom or b"") + self.pixels.nbytes

    def to_json(self) -> dict[str, Any]:
        """What the API returns for it."""
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "width": self.width,
            "height": self.height,
            "analysed_at": self.analysed_at,
            "can_store": self.dicom is not None,
            "stored_study_uid": self.stored_study_uid,
            **self.finding,
        }


class UploadStore:
    """The recent upload results of this process, by random id, each visible to its owner only."""

    def __init__(self) -> None:
        self._items: dict[str, UploadResult] = {}
        self._lock = threading.Lock()

    def add(self, result: UploadResult) -> None:
        """Keep ``result``; the oldest go when the store is full."""
        with self._lock:
            self._expire()
            self._items[result.id] = result
            while len(self._items) > _MAX_ENTRIES or sum(r.size for r in self._items.values()) > _MAX_BYTES:
                oldest = min(self._items.values(), key=lambda r: r.created)
                del self._items[oldest.id]

    def get(self, upload_id: str, owner: str) -> UploadResult | None:
        """The result if it exists, has not expired and belongs to ``owner``."""
        with self._lock:
            self._expire()
            result = self._items.get(upload_id)
        return result if result is not None and result.owner == owner else None

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, r in self._items.items() if now - r.created > KEEP_SECONDS]:
            del self._items[key]


def _display_name(name: str) -> str:
    """The upload's base name, printable characters only, at most 100 (shown, never used as a path)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:100] or "upload"


def _decode(data: bytes, kind: str, max_pixels: int) -> npt.NDArray[np.float32]:
    """The display image of the upload, through a private temporary file removed at once."""
    if kind == "dicom":
        from pacs_bridge.receive.decode import InflatesTooLarge, dataset_from_part10

        # A deflated data set may inflate to what the pixel cap allows (4 bytes a pixel), never more.
        try:
            ds = dataset_from_part10(data, 4 * max_pixels + (1 << 20))
        except InflatesTooLarge as exc:
            raise UploadError(f"the DICOM file is too large once inflated ({exc})") from exc
        except Exception as exc:
            raise UploadError(f"not a readable DICOM file: {exc}") from exc
        if "PixelData" not in ds:
            raise UploadError(
                "the DICOM file has no pixel data (e.g. a structured report or a presentation state): "
                "only images can be analysed"
            )
    from pacs_bridge.inference.analyse import load_image

    suffix = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}[kind]
    handle, name = tempfile.mkstemp(prefix="pacs-bridge-upload-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as fh:
            fh.write(data)
        try:
            image = load_image(Path(name), max_pixels=max_pixels)
        except ImageReadError as exc:
            raise UploadError(str(exc).replace(name, "the file")) from exc
        except MemoryError as exc:
            raise UploadError("the image is too large to decode") from exc
    finally:
        Path(name).unlink(missing_ok=True)
    if image.ndim != 2:
        raise UploadError(f"expected a grayscale radiograph, got an image of shape {image.shape}")
    if min(image.shape) < 8:
        raise UploadError(f"image too small to analyse ({image.shape[1]}x{image.shape[0]})")
    return np.asarray(image, dtype=np.float32)


def _scored_boxes(value: Any) -> list[dict[str, Any]]:
    """Boxes as ``{"box": [x0, y0, x1, y1], "score": s}``, from ``(box, score)`` pairs or such dicts."""
    out: list[dict[str, Any]] = []
    for item in value or []:
        if isinstance(item, dict):
            box, score = item.get("box"), item.get("score")
        else:
            box, score = item
        if box is not None and len(box) == 4:
            out.append({"box": [float(v) for v in box], "score": None if score is None else round(float(score), 6)})
    return out


def analyse_upload(analyser: Any, name: str, data: bytes, *, owner: str, max_pixels: int) -> UploadResult:
    """Decode and analyse one uploaded file; raises :class:`UploadError` with a message for the user."""
    kind = sniff(data)
    if kind is None:
        raise UploadError("not a DICOM (PS3.10), PNG or JPEG file")
    image = _decode(data, kind, max_pixels)
    try:
        finding = analyser.analyse_images([(_display_name(name), image)])[0]
    except ValueError as exc:
        raise UploadError(f"cannot analyse the image: {exc}") from exc
    height, width = image.shape
    pixels = shrink(image)
    heatmap = getattr(finding, "heatmap", None)
    boxes = _scored_boxes(getattr(finding, "boxes", None))
    if not boxes and finding.box is not None:
        boxes = [{"box": [float(v) for v in finding.box], "score": None}]
    record = {
        "probability": round(float(finding.probability), 6),
        "fracture": bool(finding.fracture),
        "threshold": float(finding.threshold),
        "body_part": finding.body_part,
        "box": list(finding.box) if finding.box is not None else None,
        "boxes": boxes,
        "model": {"name": finding.model_name, "version": finding.model_version},
        "provider": finding.provider,
        "has_heatmap": heatmap is not None,
    }
    small_heatmap = None
    heatmap_bytes = None
    if heatmap is not None:
        small_heatmap = shrink(heatmap, 256)
        heatmap_bytes = heatmap_png(heatmap, pixels.shape[1], pixels.shape[0])
    return UploadResult(
        id=secrets.token_urlsafe(16),
        owner=owner,
        name=_display_name(name),
        kind=kind,
        width=width,
        height=height,
        finding=record,
        image_png=to_png(pixels),
        heatmap_png=heatmap_bytes,
        pixels=pixels,
        heatmap=small_heatmap,
        dicom=data if kind == "dicom" else None,
    )
