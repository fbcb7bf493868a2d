"""The SR as JavaScript viewers read it: dcmjs in Node, walked the way OHIF's cornerstone-dicom-sr walks it.

OHIF v3 reads every NUM of a measurement group that has no SCOORD through
the NUM's own ContentSequence; a group for an image without a box (every
negative) must have one there. ``tests/node`` pins dcmjs in its
package-lock.json; ``npm ci`` installs it on first use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs_bridge.config import ReportSettings
from pacs_bridge.report.findings import FindingInput, ModelInfo
from pacs_bridge.report.revision import PriorObject
from pacs_bridge.report.sr import build_sr
from tests.support.dicom_files import make_radiograph
from tests.support.paths import FRACATLAS

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
STUDY = "1.2.826.0.1.3680043.8.498.777.5"
MODEL = ModelInfo("fracatlas-cnn", "1.2.0", 0.5)
PICTURES = [
    FRACATLAS / "images" / "Fractured" / "IMG0000019.jpg",
    FRACATLAS / "images" / "Non_fractured" / "IMG0000001.jpg",
]
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="nodejs and npm not installed"
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    modules = NODE_DIR / "node_modules"
    if not (modules / "dcmjs").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=600,
        )
    return modules


def _sources() -> list[Dataset]:
    series = "1.2.826.0.1.3680043.8.498.777.5.1"
    sources = []
    for number, picture in enumerate(PICTURES, start=1):
        pixels = picture if picture.is_file() else np.random.default_rng(number).random((300, 240))
        sources.append(make_radiograph(pixels, STUDY, series_uid=series, instance_number=number))  # type: ignore[arg-type]
    return sources


def test_dcmjs_reads_every_group(tmp_path: Path, node_modules: Path) -> None:
    first, second = _sources()
    findings = [
        FindingInput(first.SOPInstanceUID, first.SOPClassUID, 0.93, True, 0.5, "hand", (221.0, 165.0, 270.0, 192.0)),
        FindingInput(second.SOPInstanceUID, second.SOPClassUID, 0.07, False, 0.5),
    ]
    states = {
        f.sop_instance_uid: PriorObject(GSPS_CLASS, f"2.25.{index}", "2.25.99", STUDY)
        for index, f in enumerate(findings, start=1)
    }
    path = tmp_path / "sr.dcm"
    build_sr([first, second], findings, MODEL, ReportSettings(), presentation_states=states).save_as(
        path, enforce_file_format=True
    )
    proc = subprocess.run(
        ["node", str(NODE_DIR / "read_sr.mjs"), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(proc.stdout)
    assert [g["probability"] for g in groups] == [93.0, 7.0]
    assert [g["finding"] for g in groups] == ["Fracture", "Fracture"]
    assert [g["evaluation"] for g in groups] == ["Present", "Absent"]
    assert groups[0]["region"] == [221.0, 165.0, 270.0, 165.0, 270.0, 192.0, 221.0, 192.0, 221.0, 165.0]
    assert groups[1]["region"] is None
    for group, finding in zip(groups, findings, strict=True):
        assert group["sources"] == [
            {
                "value_type": "IMAGE",
                "image": finding.sop_instance_uid,
                "presentation_state": states[finding.sop_instance_uid].sop_instance_uid,
            }
        ]
