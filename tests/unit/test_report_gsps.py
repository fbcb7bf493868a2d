"""The presentation state: valid IOD (dciodvfy), DCMTK applies it and draws the box, negatives carry text only."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset

from pacs_bridge.config import ReportSettings
from pacs_bridge.report.findings import FindingInput, ModelInfo
from pacs_bridge.report.gsps import GSPS_SERIES_NUMBER, build_gsps, heatmap_contours
from tests.support.dicom_files import make_radiograph
from tests.support.paths import FRACATLAS

POSITIVE = FRACATLAS / "images" / "Fractured" / "IMG0000019.jpg"
STUDY = "1.2.826.0.1.3680043.8.498.777.3"
MODEL = ModelInfo("fracatlas-cnn", "1.2.0", 0.5)
BOX = (221.0, 165.0, 270.0, 192.0)
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"

needs_fracatlas = pytest.mark.skipif(not POSITIVE.is_file(), reason="FracAtlas images not available")
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
needs_dcmp2pgm = pytest.mark.skipif(shutil.which("dcmp2pgm") is None, reason="dcmtk not installed")


def _source(path: Path | None = None, **options: object) -> Dataset:
    picture: Path | npt.NDArray[np.float64] = POSITIVE
    if not POSITIVE.is_file():
        picture = np.random.default_rng(3).random((512, 410))
    return make_radiograph(picture, STUDY, path=path, **options)  # type: ignore[arg-type]


def _heat(source: Dataset) -> npt.NDArray[np.float32]:
    heat = np.zeros((int(source.Rows), int(source.Columns)), dtype=np.float32)
    heat[150:210, 200:290] = 0.9
    return heat


def _positive(source: Dataset) -> FindingInput:
    return FindingInput(source.SOPInstanceUID, source.SOPClassUID, 0.93, True, 0.5, "hand", BOX, heatmap=_heat(source))


def _negative(source: Dataset) -> FindingInput:
    return FindingInput(source.SOPInstanceUID, source.SOPClassUID, 0.07, False, 0.5, heatmap=_heat(source))


def _errors(path: Path) -> list[str]:
    output = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (output.stdout + output.stderr).splitlines() if line.startswith("Error")]


def _pgm(path: Path) -> npt.NDArray[np.uint8]:
    data = path.read_bytes()
    match = re.match(rb"P5\s+(\d+)\s+(\d+)\s+(\d+)\s", data)
    assert match is not None, path
    width, height, _ = (int(v) for v in match.groups())
    return np.frombuffer(data[match.end() :], dtype=np.uint8).reshape(height, width)


def test_positive_draws_box_heat_outline_and_label() -> None:
    source = _source()
    gsps = build_gsps(source, _positive(source), MODEL, ReportSettings())
    assert gsps.SOPClassUID == GSPS_CLASS
    assert gsps.StudyInstanceUID == STUDY
    assert gsps.SeriesNumber == GSPS_SERIES_NUMBER
    assert gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (annotation,) = gsps.GraphicAnnotationSequence
    assert annotation.GraphicLayer == "AI"
    graphics = annotation.GraphicObjectSequence
    assert len(graphics) == 2  # the box and the one heat outline
    box = np.asarray(graphics[0].GraphicData, dtype=np.float32).reshape(-1, 2)
    assert box.min(axis=0).tolist() == [221.0, 165.0] and box.max(axis=0).tolist() == [270.0, 192.0]
    assert all(g.GraphicAnnotationUnits == "PIXEL" and g.GraphicType == "POLYLINE" for g in graphics)
    text = annotation.TextObjectSequence[0].UnformattedTextValue
    for part in ("fracture suspected, 93%", "fracatlas-cnn 1.2.0", "AI result, not a diagnosis"):
        assert part in text
    assert int(gsps[0x6000, 0x0010].value) == int(source.Rows)


def test_negative_has_the_label_only() -> None:
    source = _source()
    gsps = build_gsps(source, _negative(source), MODEL, ReportSettings())
    (annotation,) = gsps.GraphicAnnotationSequence
    assert "GraphicObjectSequence" not in annotation
    assert "no fracture detected, 7%" in annotation.TextObjectSequence[0].UnformattedTextValue
    assert (0x6000, 0x3000) not in gsps


def test_heatmap_contours_follow_the_threshold() -> None:
    heat = np.zeros((100, 120), dtype=np.float32)
    heat[20:40, 30:60] = 0.8
    heat[70:90, 10:20] = 0.3  # below heatmap_min 0.5
    (outline,) = heatmap_contours(heat, 0.5, 100, 120)
    assert outline[0].tolist() == outline[-1].tolist()
    assert outline[:, 0].min() == pytest.approx(30.5) and outline[:, 0].max() == pytest.approx(59.5)
    assert outline[:, 1].min() == pytest.approx(20.5) and outline[:, 1].max() == pytest.approx(39.5)
    # A heatmap on a coarser grid is scaled to the image.
    (scaled,) = heatmap_contours(heat[::2, ::2], 0.5, 100, 120)
    assert abs(scaled[:, 0].min() - 30) < 3 and abs(scaled[:, 1].max() - 40) < 3


@needs_dciodvfy
@pytest.mark.parametrize("kind", ["positive", "negative"])
def test_gsps_passes_dciodvfy(tmp_path: Path, kind: str) -> None:
    source = _source()
    finding = _positive(source) if kind == "positive" else _negative(source)
    path = tmp_path / "gsps.dcm"
    build_gsps(source, finding, MODEL, ReportSettings()).save_as(path, enforce_file_format=True)
    assert not _errors(path)


@needs_dciodvfy
def test_gsps_without_optional_source_attributes(tmp_path: Path) -> None:
    """Imager Pixel Spacing, Patient Orientation, Laterality and Body Part Examined are optional for DX/CR."""
    source = _source(body_part=None, laterality=None, view_position=None)
    for keyword in ("ImagerPixelSpacing", "PixelSpacing", "PatientOrientation", "ImageLaterality", "Laterality"):
        if keyword in source:
            delattr(source, keyword)
    path = tmp_path / "gsps.dcm"
    build_gsps(source, _positive(source), MODEL, ReportSettings()).save_as(path, enforce_file_format=True)
    assert not _errors(path)


@needs_dcmp2pgm
def test_dcmtk_applies_the_presentation_state(tmp_path: Path) -> None:
    """dcmp2pgm renders the image through the presentation state and the overlay of its "AI" layer.

    DCMTK renders the image (VOI, presentation LUT) and hands each activated
    overlay of a graphic layer over as a bitmap, as its viewer composes them;
    composed here the same way, the box shows where the finding is and the
    image looks as it does without the presentation state everywhere else.
    """
    source_path = tmp_path / "source.dcm"
    source = _source(source_path)
    gsps_path = tmp_path / "gsps.dcm"
    build_gsps(source, _positive(source), MODEL, ReportSettings()).save_as(gsps_path, enforce_file_format=True)
    subprocess.run(["dcmp2pgm", str(source_path), str(tmp_path / "plain.pgm")], check=True, cwd=tmp_path)
    subprocess.run(
        ["dcmp2pgm", "-d", "-p", str(gsps_path), str(source_path), str(tmp_path / "with.pgm")],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    plain, rendered = _pgm(tmp_path / "plain.pgm"), _pgm(tmp_path / "with.pgm")
    overlays = sorted(tmp_path.glob("ovl_*.pgm"))
    assert len(overlays) == 1, "the AI layer's overlay was not activated"
    overlay = _pgm(overlays[0]) > 0
    composed = np.where(overlay, 255, rendered)
    x0, y0, x1, y1 = (int(v) for v in BOX)
    edge = overlay[y0 - 1 : y0 + 1, x0:x1].any(axis=0)  # the top edge of the box, within a pixel
    assert edge.mean() > 0.9
    assert (composed[y0 - 1 : y0 + 1, x0:x1] != plain[y0 - 1 : y0 + 1, x0:x1]).any()
    assert np.array_equal(rendered, plain), "the presentation state changes how the image itself looks"
    inside = composed[y0 + 6 : y1 - 6, x0 + 6 : x1 - 6]
    assert np.array_equal(inside, plain[y0 + 6 : y1 - 6, x0 + 6 : x1 - 6]), "the box is an outline, not a fill"
