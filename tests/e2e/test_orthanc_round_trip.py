"""End to end with a real Orthanc as the hospital PACS.

Orthanc holds a DX study made from FracAtlas radiographs and pushes it to a
running ``pacs-bridge serve`` through its REST API; pacs-bridge settles the
study, analyses it, and sends a TID 1500 SR and annotated images back into
the same study in Orthanc.
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
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
OBJECTS = 6  # per 2-image study: the SR, 2 annotated images, 2 presentation states, the study summary
IMAGES = ["images/Fractured/IMG0000019.jpg", "images/Non_fractured/IMG0000001.jpg"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def site(
    tmp_path: Path, model_dir: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[OrthancServer, ServeProcess]]:
    """Orthanc and pacs-bridge registered with each other, both running."""
    bridge_port = free_port()
    pacs = OrthancServer(tmp_path, {"bridge": ("PACS_BRIDGE", "127.0.0.1", bridge_port)})
    pacs.start()
    config: dict[str, Any] = {
        "dicom": {"allowed_calling_aets": ["ORTHANC@127.0.0.1"]},
        "analysis": {"enabled": True, "model_dir": str(model_dir), "intra_op_threads": 1},
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
        "send": {"retry_initial_seconds": 1, "retry_max_seconds": 2},
        "study": {"settle_seconds": getattr(request, "param", 1.0)},
    }
    server = ServeProcess(tmp_path / "bridge", config, port=bridge_port)
    server.start()
    try:
        yield pacs, server
    finally:
        server.stop()
        pacs.stop()


def _upload_study(pacs: OrthancServer, folder: Path) -> tuple[str, str, list[str]]:
    """Two radiographs as one DX study in Orthanc; (StudyInstanceUID, Orthanc study id, SOP UIDs)."""
    study_uid = generate_uid()
    series_uid = generate_uid()
    sops = []
    orthanc_study = ""
    for number, name in enumerate(IMAGES, start=1):
        path = folder / f"{number}.dcm"
        ds = make_radiograph(FRACATLAS / name, study_uid, series_uid=series_uid, instance_number=number, path=path)
        sops.append(str(ds.SOPInstanceUID))
        orthanc_study = pacs.upload(path)["ParentStudy"]
    return study_uid, orthanc_study, sops


def _push(pacs: OrthancServer, orthanc_study: str) -> None:
    pacs.rest("POST", "/modalities/bridge/store", json={"Resources": [orthanc_study], "Synchronous": True})


def _objects_in_orthanc(pacs: OrthancServer, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    by_class: dict[str, list[dict[str, Any]]] = {}
    for item in pacs.instances_of_study(study_uid):
        tags = pacs.rest("GET", f"/instances/{item['ID']}/simplified-tags")
        by_class.setdefault(str(tags["SOPClassUID"]).strip(), []).append(item)
    return by_class


def _wait_for_results(pacs: OrthancServer, study_uid: str, count: int, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = _objects_in_orthanc(pacs, study_uid)
        # Secondary captures: one annotated image per analysed image, and the study summary.
        if (
            len(found.get(SR_CLASS, [])) == 1
            and len(found.get(SC_CLASS, [])) == count + 1
            and len(found.get(GSPS_CLASS, [])) == count
        ):
            return found
        time.sleep(0.5)
    raise TimeoutError(f"results not in Orthanc after {timeout} s: { {k: len(v) for k, v in found.items()} }")


def _sr_certainties(sr: pydicom.Dataset) -> list[float]:
    values: list[float] = []

    def walk(items: Any) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "111012" and "MeasuredValueSequence" in item:
                values.append(float(item.MeasuredValueSequence[0].NumericValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return values


def test_orthanc_push_is_analysed_and_results_return_to_the_same_study(
    site: tuple[OrthancServer, ServeProcess], tmp_path: Path
) -> None:
    pacs, server = site
    study_uid, orthanc_study, sops = _upload_study(pacs, tmp_path)
    _push(pacs, orthanc_study)
    row = server.wait_for_state(study_uid, {"done", "failed"}, timeout=90)
    assert row["state"] == "done", row
    assert row["instances"] == 2
    assert {f["sop_instance_uid"] for f in row["findings"]} == set(sops)
    for finding in row["findings"]:
        assert 0.0 <= finding["probability"] <= 1.0
        assert finding["model"]["name"] == "tiny-test"

    found = _wait_for_results(pacs, study_uid, count=2)
    assert len(found[SR_CLASS]) == 1
    sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(found[SR_CLASS][0]["ID"])))
    assert sr.StudyInstanceUID == study_uid
    expected = sorted(f["probability"] * 100 for f in row["findings"])
    assert sorted(_sr_certainties(sr)) == pytest.approx(expected, abs=0.051)
    assert "Imaging Measurement Report" in str(sr.ConceptNameCodeSequence[0].CodeMeaning)
    captures = [pydicom.dcmread(io.BytesIO(pacs.instance_file(i["ID"]))) for i in found[SC_CLASS]]
    assert {c.StudyInstanceUID for c in captures} == {study_uid}
    assert all(c.BurnedInAnnotation == "YES" for c in captures)
    states = [pydicom.dcmread(io.BytesIO(pacs.instance_file(i["ID"]))) for i in found[GSPS_CLASS]]
    referenced = {s.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID for s in states}
    assert referenced == set(sops)
    assert "patient" not in server.log().lower() or "PB-TEST-0001" not in server.log()


@pytest.mark.parametrize("site", [6.0], indirect=True)  # time to stop the PACS before results are due
def test_results_survive_a_pacs_outage(site: tuple[OrthancServer, ServeProcess], tmp_path: Path) -> None:
    pacs, server = site
    study_uid, orthanc_study, _ = _upload_study(pacs, tmp_path)
    _push(pacs, orthanc_study)
    pacs.stop()  # the PACS goes down before the results are due
    assert server.results()[0]["state"] == "receiving"
    server.wait_for_state(study_uid, {"done"}, timeout=90)
    time.sleep(3)  # a few failed delivery attempts
    pending = server.results()[0]["deliveries"]
    assert pending.get("pending", 0) == OBJECTS and not pending.get("sent"), pending
    pacs.start()
    _wait_for_results(pacs, study_uid, count=2)
    deadline = time.monotonic() + 30
    while server.results()[0]["deliveries"].get("sent") != OBJECTS and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.results()[0]["deliveries"] == {"pending": 0, "sent": OBJECTS, "dead": 0}


def test_reanalysis_replaces_rather_than_duplicates(site: tuple[OrthancServer, ServeProcess], tmp_path: Path) -> None:
    pacs, server = site
    study_uid, orthanc_study, _ = _upload_study(pacs, tmp_path)
    _push(pacs, orthanc_study)
    server.wait_for_state(study_uid, {"done"}, timeout=90)
    _wait_for_results(pacs, study_uid, count=2)
    before = len(pacs.instances_of_study(study_uid))
    assert before == 2 + OBJECTS
    proc = server.cli("reanalyse", study_uid)
    assert proc.returncode == 0, proc.stderr
    time.sleep(1)
    server.wait_for_state(study_uid, {"done"}, timeout=90)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        deliveries = server.results()[0]["deliveries"]
        if deliveries.get("sent") == OBJECTS and not deliveries.get("pending"):
            break
        time.sleep(0.5)
    assert server.results()[0]["deliveries"].get("sent") == OBJECTS
    assert len(pacs.instances_of_study(study_uid)) == before
    assert server.log().count(f"study {study_uid} analysed") == 2
