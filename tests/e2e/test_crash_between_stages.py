"""kill -9 at every hand-over between stages: nothing lost, nothing done twice.

The service is killed with SIGKILL (through the failpoints in
:mod:`pacs_bridge.failpoints`) just before or just after a stage commits its
outcome, restarted without the failpoint, and must then finish the study:
every acknowledged instance kept, the study ``done``, each result object in
Orthanc exactly once, one analysis result per instance.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

from pacs_bridge.send.dimse import keep_responses
from tests.support.dicom_files import make_radiograph
from tests.support.orthanc import OrthancServer, orthanc_available
from tests.support.paths import FRACATLAS
from tests.support.serve import ServeProcess, free_port
from tests.support.tiny_model import build_tiny_model

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc binary not installed"),
]

IMAGES = ["images/Fractured/IMG0000019.jpg", "images/Non_fractured/IMG0000001.jpg"]
POINTS = [
    "analyse.before-commit",
    "analyse.after-commit",
    "publish.before-commit",
    "publish.after-commit",
    "deliver.before-commit",
    "deliver.after-commit",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path, {"bridge": ("PACS_BRIDGE", "127.0.0.1", free_port())})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _store(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE"))
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_stage_boundary_loses_nothing(tmp_path: Path, pacs: OrthancServer, model_dir: Path, point: str) -> None:
    config: dict[str, Any] = {
        "analysis": {"enabled": True, "model_dir": str(model_dir), "intra_op_threads": 1},
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
        "send": {"retry_initial_seconds": 0.5, "retry_max_seconds": 1},
        "study": {"settle_seconds": 0.5},
        "queue": {"lease_seconds": 3, "poll_seconds": 0.2},
    }
    study_uid, series_uid = generate_uid(), generate_uid()
    sources = [
        make_radiograph(FRACATLAS / name, study_uid, series_uid=series_uid, instance_number=number)
        for number, name in enumerate(IMAGES, start=1)
    ]
    port = free_port()
    doomed = ServeProcess(
        tmp_path / "bridge", config, port=port, env={"PACS_BRIDGE_FAILPOINTS": f"{point}=kill"}
    ).start()
    assert _store(port, sources) == [0, 0]
    assert doomed.wait_exit(timeout=90) == -signal.SIGKILL, doomed.log()[-3000:]
    assert f"failpoint {point}" in doomed.log()

    with ServeProcess(tmp_path / "bridge", config, port=port) as server:
        row = server.wait_for_state(study_uid, {"done", "failed"}, timeout=90)
        assert row["state"] == "done", row
        assert len(row["findings"]) == 2 and all(f["error"] is None for f in row["findings"])
        # Every delivery ends sent; the restarted node took over the dead node's jobs.
        deadline = time.monotonic() + 60
        details: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            current = next(r for r in server.results() if r["study_instance_uid"] == study_uid)
            details = current["delivery_details"]
            if details and all(d["state"] == "sent" for d in details):
                break
            time.sleep(0.5)
        assert details and all(d["state"] == "sent" for d in details), details
        outputs = {d["sop_instance_uid"] for d in details}

    in_pacs = pacs.instances_of_study(study_uid, tags=True)
    uids = Counter(item["Tags"]["SOPInstanceUID"] for item in in_pacs)
    assert all(count == 1 for count in uids.values())
    assert set(uids) == outputs  # each result object exactly once, nothing else
    assert (tmp_path / "bridge" / "data" / "spool" / study_uid).is_dir()
    assert len(list((tmp_path / "bridge" / "data" / "spool" / study_uid).glob("*.dcm"))) == 2
