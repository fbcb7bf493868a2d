"""The annotated secondary capture: valid IOD, same study, banner, heatmap where it should be; PNG artefacts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs_bridge.config import ReportSettings
from pacs_bridge.report.capture import (
    CAPTURE_SERIES_DESCRIPTION,
    CAPTURE_SERIES_NUMBER,
    MAX_SIDE,
    banner_lines,
    build_capture,
    render_overlay,
)
from pacs_bridge.report.findings import FindingInput, ModelInfo
from pacs_bridge.report.revision import first_revision
from pacs_bridge.report.sr import build_sr
from tests.support.dicom_files import make_radiograph
from tests.support.paths import FRACATLAS as FRACATLAS_ROOT
from tests.support.render import render_sr_png

FRACATLAS = FRACATLAS_ROOT / "images"
POSITIVE = FRACATLAS / "Fractured" / "IMG0000019.jpg"
BOX = (221.1, 165.2, 269.7, 191.4)
STUDY = "1.2.826.0.1.3680043.8.498.777.2"
MODEL = ModelInfo("fracatlas-cnn", "1.2.0", 0.5)
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
# Set to refresh docs/img/result-*.png from the artefacts (kept off so a test run leaves the tree clean).

needs_fracatlas = pytest.mark.skipif(not POSITIVE.is_file(), reason="FracAtlas images not available")


def _heatmap(rows: int, columns: int, box: tuple[float, float, float, float]) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    sx, sy = (box[2] - box[0]) * 0.8, (box[3] - box[1]) * 1.1
    return np.exp(-(((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2)).astype(np.float32)


@pytest.fixture()
def source() -> Dataset:
    picture = POSITIVE if POSITIVE.is_file() else np.random.default_rng(2).random((512, 410))
    # MONOCHROME1 on purpose: the capture must show bone bright, like a viewer does.
    return make_radiograph(picture, STUDY, modality="CR", photometric="MONOCHROME1", patient_name="Doe^Jane")


def _positive(source: Dataset) -> FindingInput:
    heat = _heatmap(int(source.Rows), int(source.Columns), BOX)
    return FindingInput(source.SOPInstanceUID, source.SOPClassUID, 0.93, True, 0.5, "hand", BOX, heat)


def _negative(source: Dataset) -> FindingInput:
    return FindingInput(source.SOPInstanceUID, source.SOPClassUID, 0.07, False, 0.5, "hand", None, None)


def _png(capture: Dataset, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    cv2.imwrite(str(path), cv2.cvtColor(capture.pixel_array, cv2.COLOR_RGB2BGR))
    return path


def test_banner_text() -> None:
    settings = ReportSettings()
    finding = FindingInput("1.2", "1.2.3", 0.93, True, 0.5)
    assert banner_lines(finding, MODEL, settings) == [
        "AI: fracture suspected, 93%",
        "fracatlas-cnn 1.2.0, threshold 50%",
        "AI result, not a diagnosis",
    ]
    negative = FindingInput("1.2", "1.2.3", 0.07, False, 0.5)
    assert banner_lines(negative, MODEL, settings)[0] == "AI: no fracture detected, 7%"


def test_capture_header(source: Dataset) -> None:
    capture = build_capture(source, _positive(source), MODEL, ReportSettings())
    assert capture.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert capture.StudyInstanceUID == STUDY
    assert capture.PatientName == "Doe^Jane"
    assert capture.PatientID == source.PatientID
    assert capture.AccessionNumber == source.AccessionNumber
    assert capture.SeriesNumber == CAPTURE_SERIES_NUMBER
    assert capture.SeriesDescription == CAPTURE_SERIES_DESCRIPTION
    assert capture.BurnedInAnnotation == "YES"
    assert capture.PhotometricInterpretation == "RGB"
    assert capture.BitsAllocated == 8 and capture.SamplesPerPixel == 3
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    revision = first_revision(STUDY, MODEL, [_positive(source)], ReportSettings())
    assert capture.SOPInstanceUID == revision.sop_instance_uid("capture", source.SOPInstanceUID)
    assert (
        capture.SeriesInstanceUID != build_sr([source], [_positive(source)], MODEL, ReportSettings()).SeriesInstanceUID
    )
    again = build_capture(source, _positive(source), MODEL, ReportSettings())
    assert again.SOPInstanceUID == capture.SOPInstanceUID


def test_overlay_keeps_bone_readable(source: Dataset) -> None:
    settings = ReportSettings()
    gray = np.tile(np.linspace(0.0, 1.0, 400, dtype=np.float32), (300, 1))
    heat = np.zeros((300, 400), dtype=np.float32)
    heat[100:200, 100:200] = 1.0
    heat[0:50, 0:50] = settings.heatmap_min / 2  # below heatmap_min: not drawn
    finding = FindingInput("1.2", "1.2.3", 0.9, True, 0.5, None, None, heat)
    picture = render_overlay(gray, finding, MODEL, settings)
    banner = picture.shape[0] - round(300 * 1024 / 400)
    image = picture[banner:].astype(int)
    assert image.shape[1] == 1024  # enlarged: the longest side is at least 1024
    # Below heatmap_min the pixels stay gray (R == G == B).
    corner = image[5:60, 5:60]
    assert np.abs(corner[..., 0] - corner[..., 2]).max() <= 1
    # Inside the hot area the colour is blended, not opaque: the gray ramp still shows through.
    hot = image[400:450, 300:500]
    assert np.abs(hot[..., 0] - hot[..., 2]).max() > 30
    assert hot[..., :].mean(axis=2)[:, -1].mean() > hot[..., :].mean(axis=2)[:, 0].mean()


def test_large_images_are_reduced() -> None:
    gray = np.zeros((3000, 2500), dtype=np.float32)
    finding = FindingInput("1.2", "1.2.3", 0.1, False, 0.5, None, (100.0, 100.0, 400.0, 400.0))
    picture = render_overlay(gray, finding, MODEL, ReportSettings())
    width = round(2500 * MAX_SIDE / 3000)
    assert picture.shape[1] == width
    banner = picture.shape[0] - MAX_SIDE  # the image part is MAX_SIDE rows high
    assert 0 < banner < MAX_SIDE // 4


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_capture_passes_dciodvfy(tmp_path: Path, source: Dataset) -> None:
    for name, finding in (("positive", _positive(source)), ("negative", _negative(source))):
        path = tmp_path / f"{name}.dcm"
        build_capture(source, finding, MODEL, ReportSettings()).save_as(path, enforce_file_format=True)
        output = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        lines = (output.stdout + output.stderr).splitlines()
        assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)


@needs_fracatlas
def test_capture_artefacts(source: Dataset) -> None:
    """Writes test-artifacts/capture-*.png to look at; the positive one illustrates the docs."""
    settings = ReportSettings()
    positive = build_capture(source, _positive(source), MODEL, settings)
    negative = build_capture(source, _negative(source), MODEL, settings)
    _png(positive, "capture-positive.png")
    _png(negative, "capture-negative.png")
    picture = positive.pixel_array
    # The heatmap is centred on the box: the reddest pixels lie inside it.
    scale = picture.shape[1] / int(source.Columns)
    banner = picture.shape[0] - round(int(source.Rows) * scale)
    redness = picture[banner:, :, 0].astype(int) - picture[banner:, :, 1].astype(int)
    y, x = np.unravel_index(np.argmax(redness), redness.shape)
    assert BOX[0] * scale <= x <= BOX[2] * scale and BOX[1] * scale <= y <= BOX[3] * scale
    # Bone is bright (MONOCHROME1 was inverted): the image is mostly dark background.
    assert np.median(picture[banner:]) < 100


@needs_fracatlas
@pytest.mark.skipif(
    shutil.which("dsr2html") is None or shutil.which("chromium") is None, reason="dcmtk or chromium missing"
)
def test_sr_rendering_artefact(tmp_path: Path, source: Dataset) -> None:
    """Renders the SR as dsr2html shows it (chromium screenshot) to test-artifacts/sr.png and the docs."""
    second = make_radiograph(POSITIVE, STUDY, series_uid=str(source.SeriesInstanceUID), instance_number=2)
    findings = [_positive(source), FindingInput(second.SOPInstanceUID, second.SOPClassUID, 0.07, False, 0.5)]
    sr = build_sr([source, second], findings, MODEL, ReportSettings())
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    ARTIFACTS.mkdir(exist_ok=True)
    png = render_sr_png(tmp_path / "sr.dcm", ARTIFACTS / "sr.png", tmp_path)
    assert png.is_file() and png.stat().st_size > 10_000
