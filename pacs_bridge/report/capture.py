"""The annotated image: the radiograph with the heatmap, the box and a result banner burned in.

PS3.3 A.8.1 Secondary Capture Image IOD (SOP Class 1.2.840.10008.5.1.4.1.1.7),
built with :class:`highdicom.sc.SCImage`: RGB, 8 bits, Burned In Annotation
YES, in the source's study with its own series ("AI fracture overlay", Series
Number 9902), a Source Image Sequence pointing at the analysed image
(PS3.3 C.7.6.1) and the algorithm in the Contributing Equipment Sequence.
Every viewer shows it, including those that do not render TID 1500 SR.

The picture is the source windowed as a viewer shows it (Modality LUT, VOI
LUT or window, MONOCHROME1 inverted; :func:`pacs_bridge.imaging.dicom.decode`),
in the source's orientation, scaled so that its longest side lies between
:data:`MIN_SIDE` and :data:`MAX_SIDE` pixels (small images are enlarged so the
banner text stays crisp; large ones reduced so the object stays small). The
heatmap is blended with the JET colour map only where it reaches
``heatmap_min``, so bone stays readable elsewhere; the banner is a black strip
added *above* the image so it never covers anatomy.
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import pacs_bridge
from pacs_bridge.config import ReportSettings
from pacs_bridge.imaging.dicom import decode
from pacs_bridge.report.findings import FindingInput, ModelInfo
from pacs_bridge.report.revision import Revision, first_revision
from pacs_bridge.report.sr import contributing_equipment

__all__ = [
    "CAPTURE_SERIES_DESCRIPTION",
    "CAPTURE_SERIES_NUMBER",
    "MAX_SIDE",
    "MIN_SIDE",
    "banner_lines",
    "build_capture",
    "image_header",
    "render_overlay",
]

LOGGER = logging.getLogger(__name__)

CAPTURE_SERIES_NUMBER = 9902
"""Series Number of the annotated images: after the SR series (9901) and the acquired series."""
CAPTURE_SERIES_DESCRIPTION = "AI fracture overlay"
KIND = "capture"
"""The output kind of the annotated images, which their UIDs are derived from."""
MAX_SIDE = 2048
"""Longest side of the annotated image; larger radiographs are reduced."""
MIN_SIDE = 1024
"""Smaller radiographs are enlarged to this longest side, so the banner text is sharp."""

RGBImage = npt.NDArray[np.uint8]

_POSITIVE = (255, 96, 64)  # orange-red: fracture suspected
_NEGATIVE = (96, 220, 120)  # green: no fracture detected
_TEXT = (235, 235, 235)
_DISCLAIMER = (255, 210, 80)
_BOX = (255, 235, 0)
_FONT = cv2.FONT_HERSHEY_DUPLEX

_COPIED = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientAge",
    "StudyDescription",
    "BodyPartExamined",
    "ImageLaterality",
)


def banner_lines(finding: FindingInput, model: ModelInfo, settings: ReportSettings) -> list[str]:
    """The banner text, first line the result."""
    if finding.fracture:
        result = f"AI: fracture suspected, {finding.percent}%"
    else:
        result = f"AI: no fracture detected, {finding.percent}%"
    lines = [result, f"{model.name} {model.version}, threshold {round(finding.threshold * 100)}%"]
    if settings.banner_disclaimer:
        lines.append(settings.banner_disclaimer)
    return lines


def _fit_scale(text: str, width: int, height: int, thickness: int) -> float:
    """Font scale that makes ``text`` at most ``height`` pixels tall and ``width`` wide."""
    (w, h), _ = cv2.getTextSize(text, _FONT, 1.0, thickness)
    return max(0.2, min(height / max(h, 1), width / max(w, 1)))


def _draw_banner(width: int, lines: list[str], positive: bool) -> RGBImage:
    """A black strip with the result in large type and the model and disclaimer below."""
    unit = max(14, round(width / 28))  # height of the small lines, scales with the image
    pad = max(6, unit // 2)
    sizes = [round(unit * 1.5)] + [unit] * (len(lines) - 1)
    height = pad + sum(round(s * 1.6) for s in sizes) + pad
    banner = np.zeros((height, width, 3), dtype=np.uint8)
    y = pad
    for index, (text, size) in enumerate(zip(lines, sizes, strict=True)):
        thickness = max(1, round(size / 14))
        scale = _fit_scale(text, width - 2 * pad, size, thickness)
        (_, text_h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        line_h = round(size * 1.6)
        y_text = y + (line_h + text_h) // 2 - baseline // 2
        if index == 0:
            colour = _POSITIVE if positive else _NEGATIVE
        elif index == len(lines) - 1 and len(lines) > 2:
            colour = _DISCLAIMER
        else:
            colour = _TEXT
        cv2.putText(banner, text, (pad, y_text), _FONT, scale, colour, thickness, cv2.LINE_AA)
        y += line_h
    return banner


def _blend_heatmap(rgb: RGBImage, heatmap: npt.NDArray[Any], settings: ReportSettings) -> RGBImage:
    """Blend the heatmap over the image where it reaches ``heatmap_min``, with a soft edge."""
    heat: npt.NDArray[np.float32] = np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0.0, 1.0)
    if heat.shape != rgb.shape[:2]:
        resized = cv2.resize(heat, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
        heat = np.asarray(resized, dtype=np.float32)
    low = float(settings.heatmap_min)
    span = max(1.0 - low, 1e-6)
    # Colours span [heatmap_min, 1] so the strongest evidence is red and the faintest drawn is blue.
    level = np.clip((heat - low) / span, 0.0, 1.0)
    colour = cv2.applyColorMap(np.round(level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    edge = max(span * 0.15, 1e-3)
    alpha = float(settings.heatmap_opacity) * np.clip((heat - low) / edge, 0.0, 1.0)
    alpha = alpha[..., None]
    out = rgb.astype(np.float32) * (1.0 - alpha) + colour * alpha
    blended: RGBImage = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return blended


def _draw_box(rgb: RGBImage, box: tuple[float, float, float, float], scale: float) -> None:
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = (v * scale for v in box)
    p0 = (int(np.clip(round(x0), 0, width - 1)), int(np.clip(round(y0), 0, height - 1)))
    p1 = (int(np.clip(round(x1) - 1, 0, width - 1)), int(np.clip(round(y1) - 1, 0, height - 1)))
    thickness = max(2, round(max(height, width) / 500))
    # A dark outline under the yellow line keeps it visible on bright bone and on the heatmap.
    cv2.rectangle(rgb, p0, p1, (0, 0, 0), thickness * 2 + 2, cv2.LINE_AA)
    cv2.rectangle(rgb, p0, p1, _BOX, thickness, cv2.LINE_AA)


def render_overlay(
    pixels: npt.NDArray[Any], finding: FindingInput, model: ModelInfo, settings: ReportSettings
) -> RGBImage:
    """The annotated picture (RGB ``uint8``): banner strip on top of the windowed image with heatmap and box.

    ``pixels`` is the display image (2-D float in [0, 1], bright = bone) on the
    source pixel grid, to which ``finding.box`` and ``finding.heatmap`` refer.
    """
    gray = np.clip(np.nan_to_num(np.asarray(pixels, dtype=np.float32)), 0.0, 1.0)
    rows, columns = gray.shape
    longest = max(rows, columns)
    scale = 1.0
    if longest > MAX_SIDE:
        scale = MAX_SIDE / longest
    elif longest < MIN_SIDE:
        scale = MIN_SIDE / longest
    if scale != 1.0:
        size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
        interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
        gray = np.clip(cv2.resize(gray, size, interpolation=interpolation), 0.0, 1.0)
    rgb = np.repeat(np.round(gray * 255).astype(np.uint8)[..., None], 3, axis=2)
    # A negative image shows the plain radiograph: a heatmap normalised to its own peak
    # would paint a hot spot on every image and read as a finding.
    if finding.fracture and finding.heatmap is not None:
        heat = np.asarray(finding.heatmap)
        if heat.shape != (rows, columns):
            LOGGER.warning(
                "heatmap of %s is %s, image is %s; resized", finding.sop_instance_uid, heat.shape, (rows, columns)
            )
        rgb = _blend_heatmap(rgb, heat, settings)
    if finding.fracture:
        for box in finding.boxes:
            _draw_box(rgb, box, rgb.shape[1] / columns)
    banner = _draw_banner(rgb.shape[1], banner_lines(finding, model, settings), finding.fracture)
    return np.ascontiguousarray(np.concatenate([banner, rgb], axis=0))


def image_header(source: Dataset, model: ModelInfo, settings: ReportSettings) -> dict[str, Any]:
    """The ``highdicom.sc.SCImage`` arguments every image pacs-bridge makes takes from its source study.

    The Patient (PS3.3 C.7.1.1) and General Study (C.7.2.1) attributes of
    ``source``, and the equipment: General Equipment (C.7.5.1) and the
    Contributing Equipment Sequence naming the algorithm (C.12.1.1.1).
    """
    return {
        "manufacturer": settings.manufacturer,
        "manufacturer_model_name": "pacs-bridge",
        "software_versions": pacs_bridge.__version__,
        "institution_name": settings.institution_name,
        "patient_id": source.get("PatientID", ""),
        "patient_name": source.get("PatientName", ""),
        "patient_birth_date": source.get("PatientBirthDate", ""),
        "patient_sex": source.get("PatientSex", ""),
        "accession_number": source.get("AccessionNumber", ""),
        "study_id": source.get("StudyID", ""),
        "study_date": source.get("StudyDate", ""),
        "study_time": source.get("StudyTime", ""),
        "referring_physician_name": source.get("ReferringPhysicianName", ""),
        "transfer_syntax_uid": ExplicitVRLittleEndian,
        "contributing_equipment": [contributing_equipment(model, settings)],
    }


def build_capture(
    source: Dataset,
    finding: FindingInput,
    model: ModelInfo,
    settings: ReportSettings,
    *,
    revision: Revision | None = None,
) -> Dataset:
    """Build the annotated Secondary Capture (PS3.3 A.8.1) of one analysed image.

    ``source`` is the analysed image with its pixel data. The Series and SOP
    Instance UIDs, the Series Number and the content time come from
    ``revision`` (:mod:`pacs_bridge.report.revision`; the first revision of
    this finding alone when not given). Raises ``ValueError`` when the finding
    is not about ``source`` and :class:`~pacs_bridge.imaging.dicom.DicomDecodeError`
    when its pixels cannot be decoded.
    """
    if str(source.SOPInstanceUID) != finding.sop_instance_uid:
        raise ValueError("finding and source image differ")
    study_uid = str(source.StudyInstanceUID)
    if revision is None:
        revision = first_revision(study_uid, model, [finding], settings)
    picture = render_overlay(decode(source).pixels, finding, model, settings)
    number = int(source.get("InstanceNumber") or 1)
    capture = hd.sc.SCImage(
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        # Replaced below by the source's own (possibly empty) Patient Orientation.
        patient_orientation=("A", "F"),
        study_instance_uid=study_uid,
        series_instance_uid=revision.series_instance_uid(KIND),
        series_number=revision.series_number(CAPTURE_SERIES_NUMBER),
        sop_instance_uid=revision.sop_instance_uid(KIND, finding.sop_instance_uid),
        instance_number=max(1, number),
        **image_header(source, model, settings),
        series_description=revision.series_description(CAPTURE_SERIES_DESCRIPTION),
    )
    orientation = source.get("PatientOrientation")
    # Type 2C (PS3.3 C.7.6.1.1.1): the source's orientation, or empty when unknown.
    capture.PatientOrientation = list(orientation) if orientation and len(orientation) == 2 else []
    if "SpecificCharacterSet" in source:
        capture.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in _COPIED:
        if keyword in source and keyword not in capture:
            setattr(capture, keyword, source[keyword].value)
    if "Laterality" not in capture and "ImageLaterality" not in capture:
        side = str(source.get("Laterality") or source.get("ImageLaterality") or "").upper()
        # Type 2C (PS3.3 C.7.3.1): the source's side where it names one, else empty (unknown).
        capture.Laterality = side if side in ("L", "R") else ""
    capture.ConversionType = "WSD"
    capture.BurnedInAnnotation = "YES"
    capture.RecognizableVisualFeatures = "NO"
    capture.LossyImageCompression = "00"
    capture.ImageComments = " / ".join(banner_lines(finding, model, settings))[:10240]
    capture.DerivationDescription = f"Fracture probability overlay by {model.label}"[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = finding.sop_class_uid
    reference.ReferencedSOPInstanceUID = finding.sop_instance_uid
    capture.SourceImageSequence = [reference]
    revision.stamp(capture)
    LOGGER.debug("built capture %s of %s", capture.SOPInstanceUID, finding.sop_instance_uid)
    return capture
