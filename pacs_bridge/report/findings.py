"""What the report builders consume: one analysed image's finding, and the model that produced it.

These are plain values, independent of the database, so that the SR
(:mod:`pacs_bridge.report.sr`) and the annotated image
(:mod:`pacs_bridge.report.capture`) can be built and tested from any source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Box", "FailedImage", "FindingInput", "ModelInfo"]

Box = tuple[float, float, float, float]
"""A region ``(x0, y0, x1, y1)`` in source pixel coordinates (columns, rows; x1/y1 exclusive)."""


@dataclass(frozen=True)
class ModelInfo:
    """The algorithm, as named in TID 4019 Algorithm Identification (PS3.16) and Contributing Equipment.

    ``threshold`` is the decision threshold on the probability (0..1) above
    which a fracture is reported.
    """

    name: str
    version: str
    threshold: float

    @property
    def label(self) -> str:
        """``name version`` as shown to people."""
        return f"{self.name} {self.version}"


def _checked_box(value: Any) -> Box:
    if len(value) != 4:
        raise ValueError(f"box {value!r} is not [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {value!r} is empty")
    return (x0, y0, x1, y1)


@dataclass(frozen=True)
class FindingInput:
    """The result of analysing one source image.

    ``probability`` is the model's fracture probability in [0, 1];
    ``fracture`` is the decision (``probability >= threshold``).
    ``box`` is ``[x0, y0, x1, y1]`` in source pixel coordinates (columns,
    rows; x1/y1 exclusive), ``None`` where no region is known; ``boxes`` are
    all the suspected regions, the main one (``box``) first (filled from
    ``box`` when not given). ``heatmap`` is a
    2-D ``float32`` array on the source pixel grid (rows x columns) with values
    in [0, 1], or ``None``. ``body_part`` is a FracAtlas-style region name
    (``hand``, ``leg``, ``hip``, ``shoulder``) or a Body Part Examined value.
    """

    sop_instance_uid: str
    sop_class_uid: str
    probability: float
    fracture: bool
    threshold: float
    body_part: str | None = None
    box: Box | None = None
    heatmap: npt.NDArray[np.float32] | None = field(default=None, compare=False, repr=False)
    boxes: tuple[Box, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.probability) <= 1.0:
            raise ValueError(f"probability {self.probability} is not in [0, 1]")
        if self.box is not None:
            object.__setattr__(self, "box", _checked_box(self.box))
        boxes = tuple(_checked_box(b) for b in self.boxes)
        if self.box is not None and self.box not in boxes:
            boxes = (self.box, *boxes)
        object.__setattr__(self, "boxes", boxes)
        if self.heatmap is not None and np.asarray(self.heatmap).ndim != 2:
            raise ValueError("heatmap must be a 2-D array")

    @property
    def percent(self) -> int:
        """The probability as a whole percentage, as shown in banners."""
        return round(float(self.probability) * 100.0)


@dataclass(frozen=True)
class FailedImage:
    """A radiograph of the study that could not be analysed, and why (shown in the study summary)."""

    sop_instance_uid: str
    reason: str
    instance_number: int | None = None
