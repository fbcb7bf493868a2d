"""The TID 1500 SR: valid IOD (dciodvfy), the expected tree (dsrdump), deterministic UIDs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs_bridge.config import ReportSettings
from pacs_bridge.report.findings import FindingInput, ModelInfo
from pacs_bridge.report.revision import first_revision
from pacs_bridge.report.sr import SR_SERIES_DESCRIPTION, SR_SERIES_NUMBER, build_sr
from pacs_bridge.report.uids import device_uid, is_valid_uid
from tests.support.dicom_files import make_radiograph
from tests.support.paths import FRACATLAS as FRACATLAS_ROOT

FRACATLAS = FRACATLAS_ROOT / "images"
POSITIVE = FRACATLAS / "Fractured" / "IMG0000019.jpg"
NEGATIVE = FRACATLAS / "Fractured" / "IMG0000025.jpg"
STUDY = "1.2.826.0.1.3680043.8.498.777.1"
MODEL = ModelInfo("fracatlas-cnn", "1.2.0", 0.5)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _picture(path: Path) -> Path | np.ndarray:
    if path.is_file():
        return path
    rng = np.random.default_rng(1)
    return rng.random((256, 200))


@pytest.fixture()
def sources() -> list[Dataset]:
    first = make_radiograph(_picture(POSITIVE), STUDY, instance_number=1, patient_name="Doe^Jane")
    second = make_radiograph(
        _picture(NEGATIVE), STUDY, series_uid=str(first.SeriesInstanceUID), instance_number=2, modality="CR"
    )
    return [first, second]


@pytest.fixture()
def findings(sources: list[Dataset]) -> list[FindingInput]:
    first, second = sources
    return [
        FindingInput(first.SOPInstanceUID, first.SOPClassUID, 0.93, True, 0.5, "hand", (221.1, 165.2, 269.7, 191.4)),
        FindingInput(second.SOPInstanceUID, second.SOPClassUID, 0.07, False, 0.5, None, None),
    ]


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_sr_header(sources: list[Dataset], findings: list[FindingInput]) -> None:
    sr = build_sr(sources, findings, MODEL, ReportSettings())
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.StudyInstanceUID == STUDY
    assert sr.PatientName == "Doe^Jane"
    assert sr.PatientID == sources[0].PatientID
    assert sr.AccessionNumber == sources[0].AccessionNumber
    assert sr.Modality == "SR"
    assert sr.SeriesNumber == SR_SERIES_NUMBER
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    algorithms = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert len(algorithms) == 1
    equipment = algorithms[0]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert equipment.ManufacturerModelName == "fracatlas-cnn"
    assert equipment.SoftwareVersions == "1.2.0"
    assert equipment.DeviceUID == device_uid("fracatlas-cnn", "1.2.0")
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID


def test_sr_uids_are_deterministic(sources: list[Dataset], findings: list[FindingInput]) -> None:
    first = build_sr(sources, findings, MODEL, ReportSettings())
    again = build_sr(sources, findings, MODEL, ReportSettings())
    revision = first_revision(STUDY, MODEL, findings, ReportSettings())
    assert first.SOPInstanceUID == again.SOPInstanceUID == revision.sop_instance_uid("sr")
    assert first.SeriesInstanceUID == again.SeriesInstanceUID == revision.series_instance_uid("sr")
    newer = build_sr(sources, findings, ModelInfo(MODEL.name, "1.3.0", 0.5), ReportSettings())
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    assert is_valid_uid(str(first.SOPInstanceUID)) and len(first.SOPInstanceUID) <= 64


def test_sr_refuses_bad_inputs(sources: list[Dataset], findings: list[FindingInput]) -> None:
    with pytest.raises(ValueError):
        build_sr(sources, [], MODEL, ReportSettings())
    with pytest.raises(ValueError):
        build_sr(sources[:1], findings, MODEL, ReportSettings())


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_sr_passes_dciodvfy(tmp_path: Path, sources: list[Dataset], findings: list[FindingInput]) -> None:
    path = _write(build_sr(sources, findings, MODEL, ReportSettings()), tmp_path / "sr.dcm")
    output = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (output.stdout + output.stderr).splitlines()
    assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)


@pytest.mark.dcmtk
@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk not installed")
def test_sr_tree_in_dsrdump(tmp_path: Path, sources: list[Dataset], findings: list[FindingInput]) -> None:
    path = _write(build_sr(sources, findings, MODEL, ReportSettings()), tmp_path / "sr.dcm")
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=True).stdout
    for expected in (
        '"Imaging Measurement Report"',
        'Observer Type")=(121007,DCM,"Device")',
        '"Procedure reported")=(363680008,SCT,"Radiographic imaging procedure")',
        '"Image Library"',
        '"Imaging Measurements"',
        '"Measurement Group"',
        '"Tracking Unique Identifier"',
        '"Algorithm Name")="fracatlas-cnn"',
        '"Algorithm Version")="1.2.0"',
        '"Algorithm Parameters")="threshold=0.5"',
        '"Finding")=(72704001,SCT,"Fracture")',
        '"Fracture")=(52101004,SCT,"Present")',
        '"Fracture")=(272519000,SCT,"Absent")',
        '"Certainty of Finding")="93',
        '(%,UCUM,"Percent")',
        '"Image Region")=(POLYLINE',
        '"Finding Site")=(85562004,SCT,"Hand structure")',
        "Verification Flag   : UNVERIFIED",
    ):
        assert expected in dump, expected
    assert dump.count('"Measurement Group"') == 2
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "sr-dsrdump.txt").write_text(dump)
