"""Revisions end to end with a real Orthanc that keeps the first copy of every SOP Instance.

Orthanc's default ``OverwriteInstances`` is false: a second C-STORE of a
known SOP Instance UID is accepted and dropped. A result that changed must
therefore come as new instances in new series, and the newer SR must name
the one it replaces; a resend of unchanged results must add nothing.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.support.dicom_files import make_radiograph
from tests.support.orthanc import OrthancServer, orthanc_available
from tests.support.paths import FRACATLAS
from tests.support.serve import ServeProcess, free_port
from tests.support.tiny_model import build_tiny_model

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc binary not installed"),
]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
IMAGES = [
    "images/Fractured/IMG0000019.jpg",
    "images/Non_fractured/IMG0000001.jpg",
    "images/Fractured/IMG0000025.jpg",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def site(tmp_path: Path, model_dir: Path) -> Iterator[tuple[OrthancServer, ServeProcess]]:
    bridge_port = free_port()
    pacs = OrthancServer(tmp_path, {"bridge": ("PACS_BRIDGE", "127.0.0.1", bridge_port)})
    pacs.start()
    config: dict[str, Any] = {
        "dicom": {"allowed_calling_aets": ["ORTHANC@127.0.0.1"]},
        "analysis": {"enabled": True, "model_dir": str(model_dir), "intra_op_threads": 1},
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
        "send": {"retry_initial_seconds": 1, "retry_max_seconds": 2},
        "study": {"settle_seconds": 1.0},
    }
    server = ServeProcess(tmp_path / "bridge", config, port=bridge_port)
    server.start()
    try:
        yield pacs, server
    finally:
        server.stop()
        pacs.stop()


def _upload(pacs: OrthancServer, folder: Path, study_uid: str, series_uid: str, number: int) -> dict[str, Any]:
    path = folder / f"{number}.dcm"
    make_radiograph(FRACATLAS / IMAGES[number - 1], study_uid, series_uid=series_uid, instance_number=number, path=path)
    return pacs.upload(path)


def _push(pacs: OrthancServer, resources: list[str]) -> None:
    pacs.rest("POST", "/modalities/bridge/store", json={"Resources": resources, "Synchronous": True})


def _wait_delivered(server: ServeProcess, study_uid: str, sent: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    deliveries: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = next((r for r in server.results() if r["study_instance_uid"] == study_uid), None)
        if row is not None and row["state"] == "done":
            deliveries = row["deliveries"]
            if deliveries.get("sent", 0) >= sent and not deliveries.get("pending"):
                return
        time.sleep(0.5)
    raise TimeoutError(f"deliveries not done: {deliveries}\n{server.log()[-3000:]}")


def _wait_count(pacs: OrthancServer, study_uid: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = pacs.instances_of_study(study_uid)
        if len(found) >= count:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"{len(found)} instances in Orthanc, expected {count}")


def _srs(pacs: OrthancServer, study_uid: str) -> list[pydicom.Dataset]:
    srs = []
    for item in pacs.instances_of_study(study_uid):
        tags = pacs.rest("GET", f"/instances/{item['ID']}/simplified-tags")
        if str(tags["SOPClassUID"]).strip() == SR_CLASS:
            srs.append(pydicom.dcmread(io.BytesIO(pacs.instance_file(item["ID"]))))
    return sorted(srs, key=lambda ds: int(ds.InstanceNumber))


def _evidence(sr: pydicom.Dataset) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def test_a_late_image_adds_a_revision_beside_the_first(
    site: tuple[OrthancServer, ServeProcess], tmp_path: Path
) -> None:
    pacs, server = site
    study_uid, series_uid = generate_uid(), generate_uid()
    first = [_upload(pacs, tmp_path, study_uid, series_uid, n) for n in (1, 2)]
    _push(pacs, [first[0]["ParentStudy"]])
    _wait_delivered(server, study_uid, sent=6)
    _wait_count(pacs, study_uid, 2 + 6)  # SR, 2 captures, 2 presentation states, summary

    late = _upload(pacs, tmp_path, study_uid, series_uid, 3)
    _push(pacs, [late["ID"]])
    _wait_delivered(server, study_uid, sent=6 + 8)
    in_pacs = _wait_count(pacs, study_uid, 3 + 6 + 8)  # revision 2: SR, 3 captures, 3 states, summary
    assert len(in_pacs) == 3 + 6 + 8

    old, new = _srs(pacs, study_uid)
    assert (int(old.InstanceNumber), int(new.InstanceNumber)) == (1, 2)
    assert len(_evidence(old)) == 2 and len(_evidence(new)) == 3
    assert new.SeriesInstanceUID != old.SeriesInstanceUID
    assert int(new.SeriesNumber) > int(old.SeriesNumber)
    assert (new.ContentDate + new.ContentTime) > (old.ContentDate + old.ContentTime)
    predecessor = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == old.SOPInstanceUID

    # A resend of the unchanged result: the PACS already holds every object, nothing is added.
    proc = server.cli("resend", study_uid)
    assert proc.returncode == 0, proc.stderr
    _wait_delivered(server, study_uid, sent=6 + 8)
    time.sleep(2)
    assert len(pacs.instances_of_study(study_uid)) == 3 + 6 + 8
    assert len(_srs(pacs, study_uid)) == 2
