"""The study summary: one picture that lists every radiograph of the study and what the model said of it.

PS3.3 A.8.1 Secondary Capture Image IOD (SOP Class 1.2.840.10008.5.1.4.1.1.7),
built with :class:`highdicom.sc.SCImage`: RGB, 8 bits, Burned In Annotation
YES, in the source's study with its own series ("AI fracture summary", Series
Number 9904 plus 10 per revision), a Source Image Sequence (PS3.3 C.7.6.1)
naming every analysed image, and the algorithm in the Contributing
Equipment Sequence.

Per analysed image a row with its thumbnail (windowed as a viewer shows it,
:func:`pacs_bridge.imaging.dicom.decode`), its instance number, and the
finding in words with the probability: "fracture suspected" or "no fracture
detected by the model". Below them the images that could not be analysed,
each with its reason, so that the radiologist knows which images the result
does not cover. The header names the model and says "AI result, not a
diagnosis" (the configured disclaimer). Nothing here reads optional
attributes of the sources.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from pacs_bridge.config import ReportSettings
from pacs_bridge.report.capture import image_header
from pacs_bridge.report.findings import FailedImage, FindingInput, ModelInfo
from pacs_bridge.report.revision import Revision, first_revision

__all__ = [
    "KIND",
    "SUMMARY_SERIES_DESCRIPTION",
    "SUMMARY_SERIES_NUMBER",
    "SummaryImage",
    "build_summary",
    "finding_text",
    "render_summary",
]

LOGGER = logging.getLogger(__name__)

KIND = "summary"
"""The output kind of the study summary, which its UIDs are derived from."""
SUMMARY_SERIES_NUMBER = 9904
"""Series Number of the summary: after the SR, annotated images and presentation states."""
SUMMARY_SERIES_DESCRIPTION = "AI fracture summary"

_WIDTH = 1200
_THUMB = 200
_PAD = 16
_FONT = cv2.FONT_HERSHEY_DUPLEX
_POSITIVE = (255, 96, 64)
_NEGATIVE = (96, 220, 120)
_FAILED = (255, 210, 80)
_TEXT = (235, 235, 235)
_MAX_ROWS = 40  # a study with more images lists the first ones and says how many are left out


@dataclass(frozen=True)
class SummaryImage:
    """One analysed image as the summary shows it: its finding, display pixels (2-D, [0, 1]) and number."""

    finding: FindingInput
    pixels: npt.NDArray[Any] | None
    instance_number: int | None = None


def finding_text(finding: FindingInput) -> str:
    """The finding in plain words, with the probability."""
    if finding.fracture:
        return f"fracture suspected, {finding.percent}%"
    return f"no fracture detected by the model, {finding.percent}%"


def _put(canvas: npt.NDArray[np.uint8], text: str, x: int, y: int, size: float, colour: tuple[int, int, int]) -> None:
    thickness = max(1, round(size * 1.6))
    cv2.putText(canvas, text, (x, y), _FONT, size, colour, thickness, cv2.LINE_AA)


def _thumbnail(pixels: npt.NDArray[Any] | None) -> npt.NDArray[np.uint8]:
    box = np.full((_THUMB, _THUMB, 3), 40, dtype=np.uint8)
    if pixels is None:
        return box
    gray = np.clip(np.nan_to_num(np.asarray(pixels, dtype=np.float32)), 0.0, 1.0)
    rows, columns = gray.shape
    scale = _THUMB / max(rows, columns)
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    small = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    small8 = np.round(np.clip(small, 0.0, 1.0) * 255).astype(np.uint8)
    y0, x0 = (_THUMB - size[1]) // 2, (_THUMB - size[0]) // 2
    box[y0 : y0 + size[1], x0 : x0 + size[0]] = small8[..., None]
    return box


def render_summary(
    images: Sequence[SummaryImage],
    failed: Sequence[FailedImage],
    model: ModelInfo,
    settings: ReportSettings,
) -> npt.NDArray[np.uint8]:
    """The summary picture (RGB ``uint8``): a header, a row per analysed image, then the images not analysed."""
    shown = list(images)[:_MAX_ROWS]
    failed_shown = list(failed)[:_MAX_ROWS]
    header_h = 130
    row_h = _THUMB + _PAD
    failed_h = (48 + 36 * len(failed_shown)) if failed_shown else 0
    more = max(0, len(images) - len(shown)) + max(0, len(failed) - len(failed_shown))
    height = header_h + row_h * len(shown) + failed_h + (40 if more else 0) + _PAD
    canvas = np.zeros((height, _WIDTH, 3), dtype=np.uint8)
    positives = sum(1 for item in images if item.finding.fracture)
    if positives:
        headline, colour = f"AI: fracture suspected on {positives} of {len(images)} image(s)", _POSITIVE
    else:
        headline, colour = f"AI: no fracture detected by the model on {len(images)} image(s)", _NEGATIVE
    _put(canvas, headline, _PAD, 44, 1.1, colour)
    _put(canvas, f"{model.label}, threshold {round(model.threshold * 100)}%", _PAD, 82, 0.7, _TEXT)
    if settings.banner_disclaimer:
        _put(canvas, settings.banner_disclaimer, _PAD, 114, 0.7, _FAILED)
    y = header_h
    for number, item in enumerate(shown, start=1):
        canvas[y : y + _THUMB, _PAD : _PAD + _THUMB] = _thumbnail(item.pixels)
        label = f"Image {item.instance_number if item.instance_number is not None else number}"
        x_text = _PAD * 2 + _THUMB
        _put(canvas, label, x_text, y + 50, 0.8, _TEXT)
        _put(
            canvas, finding_text(item.finding), x_text, y + 100, 0.9, _POSITIVE if item.finding.fracture else _NEGATIVE
        )
        y += row_h
    if failed_shown:
        _put(canvas, "Not analysed:", _PAD, y + 34, 0.8, _FAILED)
        y += 48
        for failure in failed_shown:
            label = f"Image {failure.instance_number}" if failure.instance_number is not None else "Image"
            _put(canvas, f"{label}: {failure.reason}"[:90], _PAD * 2, y + 26, 0.6, _FAILED)
            y += 36
    if more:
        _put(canvas, f"... and {more} more image(s), see the SR", _PAD, y + 30, 0.7, _TEXT)
    return canvas


def build_summary(
    sources: Sequence[Dataset],
    images: Sequence[SummaryImage],
    failed: Sequence[FailedImage],
    model: ModelInfo,
    settings: ReportSettings,
    *,
    revision: Revision | None = None,
) -> Dataset:
    """Build the study summary Secondary Capture (PS3.3 A.8.1).

    ``sources`` are headers of the analysed images (the first gives the
    patient and study attributes); ``images`` their findings and display
    pixels. UIDs, Series Number and content time come from ``revision``.
    Raises ``ValueError`` when there is no analysed image.
    """
    if not sources or not images:
        raise ValueError("a summary needs at least one analysed image")
    first = sources[0]
    study_uid = str(first.StudyInstanceUID)
    if revision is None:
        revision = first_revision(study_uid, model, [i.finding for i in images], settings, failed)
    picture = render_summary(images, failed, model, settings)
    summary = hd.sc.SCImage(
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("A", "F"),  # replaced below: a summary has no orientation
        study_instance_uid=study_uid,
        series_instance_uid=revision.series_instance_uid(KIND),
        series_number=revision.series_number(SUMMARY_SERIES_NUMBER),
        sop_instance_uid=revision.sop_instance_uid(KIND),
        instance_number=revision.number,
        **image_header(first, model, settings),
        series_description=revision.series_description(SUMMARY_SERIES_DESCRIPTION),
    )
    summary.PatientOrientation = []  # Type 2C (PS3.3 C.7.6.1.1.1): not an image of the patient's anatomy
    summary.Laterality = ""  # Type 2C (PS3.3 C.7.3.1): a summary of the study has no side
    if "SpecificCharacterSet" in first:
        summary.SpecificCharacterSet = first.SpecificCharacterSet
    for keyword in ("IssuerOfPatientID", "OtherPatientIDsSequence", "PatientAge", "StudyDescription"):
        if keyword in first and keyword not in summary:
            setattr(summary, keyword, first[keyword].value)
    summary.ConversionType = "WSD"
    summary.BurnedInAnnotation = "YES"
    summary.RecognizableVisualFeatures = "NO"
    summary.LossyImageCompression = "00"
    lines = [f"{model.label}"] + [
        f"image {i.instance_number or n}: {finding_text(i.finding)}" for n, i in enumerate(images, start=1)
    ]
    lines += [f"not analysed: {f.reason}" for f in failed]
    if settings.banner_disclaimer:
        lines.append(settings.banner_disclaimer)
    summary.ImageComments = " / ".join(lines)[:10240]
    summary.DerivationDescription = f"Study summary of fracture detection by {model.label}"[:1024]
    references = []
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for item in images:
        if item.finding.sop_instance_uid in by_uid:
            reference = Dataset()
            reference.ReferencedSOPClassUID = item.finding.sop_class_uid
            reference.ReferencedSOPInstanceUID = item.finding.sop_instance_uid
            references.append(reference)
    summary.SourceImageSequence = references
    revision.stamp(summary)
    LOGGER.debug("built study summary %s of study %s: %d image(s)", summary.SOPInstanceUID, study_uid, len(images))
    return summary
