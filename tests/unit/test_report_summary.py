"""The study summary and the SR built from sources without the optional DX/CR attributes: valid IODs (dciodvfy)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs_bridge.config import ReportSettings
from pacs_bridge.imaging.dicom import decode
from pacs_bridge.report.capture import build_capture
from pacs_bridge.report.findings import FailedImage, FindingInput, ModelInfo
from pacs_bridge.report.sr import build_sr
from pacs_bridge.report.summary import SUMMARY_SERIES_NUMBER, SummaryImage, build_summary, finding_text
from tests.support.dicom_files import make_radiograph
from tests.support.paths import FRACATLAS

STUDY = "1.2.826.0.1.3680043.8.498.777.4"
MODEL = ModelInfo("fracatlas-cnn", "1.2.0", 0.5)
PICTURES = [
    FRACATLAS / "images" / "Fractured" / "IMG0000019.jpg",
    FRACATLAS / "images" / "Non_fractured" / "IMG0000001.jpg",
]
OPTIONAL = (
    "ImagerPixelSpacing",
    "PixelSpacing",
    "PatientOrientation",
    "ImageLaterality",
    "Laterality",
    "BodyPartExamined",
)

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")


def _sources(*, bare: bool = False) -> list[Dataset]:
    sources = []
    series = "1.2.826.0.1.3680043.8.498.777.4.1"
    for number, picture in enumerate(PICTURES, start=1):
        pixels = picture if picture.is_file() else np.random.default_rng(number).random((300, 240))
        ds = make_radiograph(pixels, STUDY, series_uid=series, instance_number=number)  # type: ignore[arg-type]
        if bare:
            for keyword in OPTIONAL:
                if keyword in ds:
                    delattr(ds, keyword)
        sources.append(ds)
    return sources


def _findings(sources: list[Dataset]) -> list[FindingInput]:
    first, second = sources
    return [
        FindingInput(first.SOPInstanceUID, first.SOPClassUID, 0.93, True, 0.5, None, (221.0, 165.0, 270.0, 192.0)),
        FindingInput(second.SOPInstanceUID, second.SOPClassUID, 0.07, False, 0.5),
    ]


def _summary(sources: list[Dataset]) -> Dataset:
    images = [
        SummaryImage(f, decode(s).pixels, int(s.InstanceNumber))
        for f, s in zip(_findings(sources), sources, strict=True)
    ]
    failed = [FailedImage("1.2.826.0.1.3680043.8.498.777.4.9", "pixel data could not be decoded", 3)]
    return build_summary(sources, images, failed, MODEL, ReportSettings())


def _errors(path: Path) -> list[str]:
    output = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (output.stdout + output.stderr).splitlines() if line.startswith("Error")]


def test_summary_lists_every_image_in_words() -> None:
    sources = _sources()
    summary = _summary(sources)
    assert summary.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert summary.StudyInstanceUID == STUDY
    assert summary.SeriesNumber == SUMMARY_SERIES_NUMBER
    assert summary.BurnedInAnnotation == "YES"
    comments = summary.ImageComments
    assert "image 1: fracture suspected, 93%" in comments
    assert "image 2: no fracture detected by the model, 7%" in comments
    assert "not analysed: pixel data could not be decoded" in comments
    assert "AI result, not a diagnosis" in comments
    assert {r.ReferencedSOPInstanceUID for r in summary.SourceImageSequence} == {s.SOPInstanceUID for s in sources}
    picture = summary.pixel_array
    assert picture.ndim == 3 and picture.shape[1] == 1200
    assert finding_text(_findings(sources)[1]) == "no fracture detected by the model, 7%"


@needs_dciodvfy
@pytest.mark.parametrize("bare", [False, True], ids=["full", "without-optional-attributes"])
def test_summary_passes_dciodvfy(tmp_path: Path, bare: bool) -> None:
    path = tmp_path / "summary.dcm"
    _summary(_sources(bare=bare)).save_as(path, enforce_file_format=True)
    assert not _errors(path)


@needs_dciodvfy
def test_sr_and_capture_without_optional_attributes(tmp_path: Path) -> None:
    """Publishing never depends on Imager Pixel Spacing, Patient Orientation, Laterality or Body Part Examined."""
    sources = _sources(bare=True)
    findings = _findings(sources)
    sr_path, capture_path = tmp_path / "sr.dcm", tmp_path / "capture.dcm"
    build_sr(sources, findings, MODEL, ReportSettings()).save_as(sr_path, enforce_file_format=True)
    build_capture(sources[0], findings[0], MODEL, ReportSettings()).save_as(capture_path, enforce_file_format=True)
    assert not _errors(sr_path)
    assert not _errors(capture_path)
