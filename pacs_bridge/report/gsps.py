"""The finding drawn on the original radiograph as a presentation state that the viewer can switch off.

PS3.3 A.33.1 Grayscale Softcopy Presentation State IOD (SOP Class
1.2.840.10008.5.1.4.1.1.11.1), built with
:class:`highdicom.pr.GrayscaleSoftcopyPresentationState`, one per analysed
image, in the source's study with its own series ("AI fracture markup",
Series Number 9903 plus 10 per revision):

- Graphic Annotation Module (PS3.3 C.10.5): on a graphic layer "AI" (PS3.3
  C.10.7), each suspected box as a closed POLYLINE and the outline of the
  heatmap where it reaches ``heatmap_min`` (:func:`heatmap_contours`, from
  :func:`cv2.findContours`) as closed POLYLINEs, all in PIXEL units on the
  source's own pixel grid; a text object in the image's top left corner
  with the result, the probability, the model and the disclaimer. A negative
  image gets the text only: no box and no heat outline.
- Overlay Plane and Overlay Activation Modules (PS3.3 C.9.2, C.11.7): the
  same boxes and outlines as a one-bit graphics overlay in group 6000 on the
  same layer, for viewers (and DCMTK's renderer) that draw presentation-state
  overlays but not graphic annotations; highdicom has no overlay API, so
  these attributes are added with pydicom.
- Softcopy VOI LUT Module (PS3.3 C.11.8): the source's window when it has
  one, else the window pacs-bridge itself displays the image with
  (:func:`pacs_bridge.imaging.dicom.decode`), so the image looks as it does
  without the presentation state; Softcopy Presentation LUT (PS3.3 C.11.6)
  INVERSE for MONOCHROME1 sources, IDENTITY otherwise.
- Contributing Equipment naming the algorithm, as on every result object.

Nothing here depends on optional attributes of the source (Imager Pixel
Spacing, Patient Orientation, Laterality, Body Part Examined).
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pack_bits

import pacs_bridge
from pacs_bridge.config import ReportSettings
from pacs_bridge.imaging.dicom import decode
from pacs_bridge.report.capture import banner_lines
from pacs_bridge.report.findings import FindingInput, ModelInfo
from pacs_bridge.report.revision import Revision, first_revision
from pacs_bridge.report.sr import contributing_equipment, source_header

__all__ = [
    "GSPS_LAYER",
    "GSPS_SERIES_DESCRIPTION",
    "GSPS_SERIES_NUMBER",
    "KIND",
    "MAX_CONTOURS",
    "box_outline",
    "build_gsps",
    "heatmap_contours",
]

LOGGER = logging.getLogger(__name__)

KIND = "gsps"
"""The output kind of the presentation states, which their UIDs are derived from."""
GSPS_SERIES_NUMBER = 9903
"""Series Number of the presentation states: after the SR (9901) and the annotated images (9902)."""
GSPS_SERIES_DESCRIPTION = "AI fracture markup"
GSPS_LAYER = "AI"
"""The graphic layer that holds everything drawn; a viewer toggles it as one."""
MAX_CONTOURS = 8
"""At most this many heat outlines (the largest) per image."""

_YELLOW = hd.color.CIELabColor(97.1, -21.6, 94.5)
_MIN_AREA_SHARE = 0.0005  # heat islands smaller than this share of the image are noise, not drawn


def box_outline(box: tuple[float, float, float, float], rows: int, columns: int) -> npt.NDArray[np.float32] | None:
    """A closed POLYLINE (column, row in PIXEL units, PS3.3 C.10.5.1.2) around ``box``, clipped to the image."""
    x0, y0, x1, y1 = box
    x0, x1 = (float(np.clip(v, 0, columns)) for v in (x0, x1))
    y0, y1 = (float(np.clip(v, 0, rows)) for v in (y0, y1))
    if x1 <= x0 or y1 <= y0:
        return None
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def heatmap_contours(heatmap: npt.NDArray[Any], level: float, rows: int, columns: int) -> list[npt.NDArray[np.float32]]:
    """Closed outlines of the heatmap where it reaches ``level``, on a ``rows`` x ``columns`` pixel grid.

    Each outline is a POLYLINE of (column, row) pixel positions (pixel
    centres, ``index + 0.5``), simplified to about one pixel of the image and
    closed (last point = first). Only the :data:`MAX_CONTOURS` largest
    outlines are kept; islands too small to matter are dropped.
    """
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.shape != (rows, columns):
        heat = np.asarray(cv2.resize(heat, (columns, rows), interpolation=cv2.INTER_LINEAR), dtype=np.float32)
    mask = np.ascontiguousarray((heat >= float(level)).astype(np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    minimum = max(4.0, _MIN_AREA_SHARE * rows * columns)
    kept = sorted((c for c in contours if cv2.contourArea(c) >= minimum), key=cv2.contourArea, reverse=True)
    epsilon = max(1.0, max(rows, columns) / 1000.0)
    outlines: list[npt.NDArray[np.float32]] = []
    for contour in kept[:MAX_CONTOURS]:
        points = cv2.approxPolyDP(contour, epsilon, True).reshape(-1, 2).astype(np.float32) + 0.5
        if len(points) < 3:
            continue
        outlines.append(np.concatenate([points, points[:1]], axis=0))
    return outlines


def _overlay(gsps: Dataset, outlines: list[npt.NDArray[np.float32]], rows: int, columns: int) -> None:
    """Add the outlines as overlay plane 6000 on :data:`GSPS_LAYER` (PS3.3 C.9.2, C.11.7)."""
    bitmap = np.zeros((rows, columns), dtype=np.uint8)
    thickness = max(1, round(max(rows, columns) / 600))
    for outline in outlines:
        points = np.round(outline - 0.5).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(bitmap, [points], True, 1, thickness)
    group = 0x6000
    gsps.add_new((group, 0x0010), "US", rows)
    gsps.add_new((group, 0x0011), "US", columns)
    gsps.add_new((group, 0x0022), "LO", "AI fracture markup")
    gsps.add_new((group, 0x0040), "CS", "G")
    gsps.add_new((group, 0x0050), "SS", [1, 1])
    gsps.add_new((group, 0x0100), "US", 1)
    gsps.add_new((group, 0x0102), "US", 0)
    gsps.add_new((group, 0x1001), "CS", GSPS_LAYER)
    gsps.add_new((group, 0x1500), "LO", "AI")
    gsps.add_new((group, 0x3000), "OW", pack_bits(bitmap.ravel()))


def _label(
    finding: FindingInput, model: ModelInfo, settings: ReportSettings, rows: int, columns: int
) -> hd.pr.TextObject:
    """The result text in the top left corner, in PIXEL units of the source."""
    text = "\r\n".join(banner_lines(finding, model, settings))
    pad = max(2.0, 0.02 * min(rows, columns))
    bottom = min(float(rows), pad + 0.12 * rows)
    return hd.pr.TextObject(
        text_value=text[:1024],
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(pad, pad, float(columns) - pad, bottom),
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )


def _voi(source: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The window pacs-bridge displays the source with, where the source names none itself."""
    if "WindowCenter" in source or "VOILUTSequence" in source:
        return None  # highdicom copies the source's own
    window = decode(source).window
    if window.center is None or window.width is None or window.width <= 0:
        return None
    return [hd.pr.SoftcopyVOILUTTransformation(window_center=float(window.center), window_width=float(window.width))]


def build_gsps(
    source: Dataset,
    finding: FindingInput,
    model: ModelInfo,
    settings: ReportSettings,
    *,
    revision: Revision | None = None,
) -> Dataset:
    """Build the Grayscale Softcopy Presentation State (PS3.3 A.33.1) that draws ``finding`` on ``source``.

    ``source`` is the analysed image (with its pixel data, which sets the
    window when the image has none). UIDs, Series Number and content time
    come from ``revision`` (the first revision of this finding alone when not
    given). Raises ``ValueError`` when the finding is not about ``source`` or
    the source is not a single grayscale image.
    """
    if str(source.SOPInstanceUID) != finding.sop_instance_uid:
        raise ValueError("finding and source image differ")
    photometric = str(source.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"a grayscale presentation state needs a MONOCHROME image, not {photometric or 'none'}")
    if int(source.get("NumberOfFrames") or 1) != 1:
        raise ValueError("a presentation state is built for single-frame images only")
    study_uid = str(source.StudyInstanceUID)
    if revision is None:
        revision = first_revision(study_uid, model, [finding], settings)
    rows, columns = int(source.Rows), int(source.Columns)
    header = source_header(source)
    voi = _voi(source)

    layer = hd.pr.GraphicLayer(
        layer_name=GSPS_LAYER,
        order=1,
        description=f"Fracture detection by {model.label}"[:64],
        display_color=_YELLOW,
    )
    outlines: list[npt.NDArray[np.float32]] = []
    if finding.fracture:
        for box in finding.boxes:
            outline = box_outline(box, rows, columns)
            if outline is not None:
                outlines.append(outline)
        if finding.heatmap is not None:
            outlines.extend(heatmap_contours(finding.heatmap, settings.heatmap_min, rows, columns))
    graphics = [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, outline, "PIXEL") for outline in outlines]
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[header],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=[_label(finding, model, settings, rows, columns)],
    )
    presentation_lut = hd.PresentationLUTTransformation(
        presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
        if photometric == "MONOCHROME1"
        else hd.PresentationLUTShapeValues.IDENTITY
    )
    number = int(source.get("InstanceNumber") or 1)
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        series_instance_uid=revision.series_instance_uid(KIND),
        series_number=revision.series_number(GSPS_SERIES_NUMBER),
        sop_instance_uid=revision.sop_instance_uid(KIND, finding.sop_instance_uid),
        instance_number=max(1, number),
        manufacturer=settings.manufacturer,
        manufacturer_model_name="pacs-bridge",
        software_versions=pacs_bridge.__version__,
        device_serial_number=pacs_bridge.__version__,
        content_label="AI_FRACTURE",
        content_description=" / ".join(banner_lines(finding, model, settings))[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        institution_name=settings.institution_name,
        voi_lut_transformations=voi,
        presentation_lut_transformation=presentation_lut,
        contributing_equipment=[contributing_equipment(model, settings)],
    )
    gsps.SeriesDescription = revision.series_description(GSPS_SERIES_DESCRIPTION)
    laterality = str(source.get("Laterality") or source.get("ImageLaterality") or "").upper()
    # Type 2C (PS3.3 C.7.3.1): the source's side where it names one, else empty (unknown).
    gsps.Laterality = laterality if laterality in ("L", "R") else ""
    # DCMTK and other renderers draw overlays of a layer with its grayscale value (PS3.3 C.10.7).
    gsps.GraphicLayerSequence[0].GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF
    if outlines:
        _overlay(gsps, outlines, rows, columns)
    if "SpecificCharacterSet" in source:
        gsps.SpecificCharacterSet = source.SpecificCharacterSet
    revision.stamp(gsps)
    # Presentation Creation Date/Time (PS3.3 C.11.10) follow the content, so a rebuild writes the same object.
    gsps.PresentationCreationDate = gsps.ContentDate
    gsps.PresentationCreationTime = gsps.ContentTime
    LOGGER.debug(
        "built presentation state %s of %s: %d graphic(s)", gsps.SOPInstanceUID, finding.sop_instance_uid, len(graphics)
    )
    return gsps
