"""Results reach a real PACS (Orthanc): same study, right content, retries through an outage, no duplicates."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from pacs_bridge.config import DestinationSettings, Settings
from pacs_bridge.report.publish import publish_study
from pacs_bridge.send.outbox import Outbox, deliver_due, resend_study
from pacs_bridge.store.db import Database, open_database
from pacs_bridge.store.models import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceResult,
    OutputObject,
    Series,
    Study,
    utcnow,
)
from tests.support.dicom_files import make_radiograph
from tests.support.orthanc import OrthancServer, free_port, orthanc_available
from tests.support.paths import FRACATLAS as FRACATLAS_ROOT

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc binary not installed"),
]

FRACATLAS = FRACATLAS_ROOT / "images" / "Fractured"
STUDY = "1.2.826.0.1.3680043.8.498.555.1"
BOX = [221, 165, 270, 192]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _picture(name: str, seed: int) -> Path | np.ndarray:
    path = FRACATLAS / name
    return path if path.is_file() else np.random.default_rng(seed).random((512, 410))


def _make_study(db: Database, folder: Path) -> tuple[int, list[Path]]:
    """Two analysed radiographs of one study, with rows as the receiver and the worker leave them."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = "1.2.826.0.1.3680043.8.498.555.2"
    sources = [
        make_radiograph(_picture("IMG0000019.jpg", 1), STUDY, series_uid=series_uid, instance_number=1),
        make_radiograph(_picture("IMG0000025.jpg", 2), STUDY, series_uid=series_uid, instance_number=2),
    ]
    paths = []
    for ds in sources:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    heat = np.zeros((int(sources[0].Rows), int(sources[0].Columns)), dtype=np.float32)
    heat[BOX[1] - 10 : BOX[3] + 10, BOX[0] - 10 : BOX[2] + 10] = 0.9
    heat_path = folder / "heat.npy"
    np.save(heat_path, heat)
    with db.session() as session:
        study = Study(study_instance_uid=STUDY, patient_id="PB-TEST-0001", accession_number="ACC0001")
        session.add(study)
        session.flush()
        series = Series(series_instance_uid=series_uid, study_id=study.id, modality="DX")
        session.add(series)
        session.flush()
        outcomes = [(0.93, True, BOX, str(heat_path)), (0.07, False, None, None)]
        for ds, path, (probability, fracture, box, heatmap) in zip(sources, paths, outcomes, strict=True):
            instance = Instance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                study_id=study.id,
                series_id=series.id,
                instance_number=int(ds.InstanceNumber),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                file_path=str(path),
                size_bytes=path.stat().st_size,
            )
            session.add(instance)
            session.flush()
            session.add(
                InstanceResult(
                    instance_id=instance.id,
                    model_name="fracatlas-cnn",
                    model_version="1.2.0",
                    ok=True,
                    probability=probability,
                    fracture=fracture,
                    threshold=0.5,
                    body_part="hand",
                    box=box,
                    heatmap_path=heatmap,
                )
            )
        return study.id, paths


def _settings(data_dir: Path, *destinations: DestinationSettings) -> Settings:
    return Settings.model_validate(
        {
            "storage": {"data_dir": str(data_dir), "fsync": False},
            "send": {"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0, "retry_for_hours": 1.0, "timeout": 3.0},
            "destinations": [d.model_dump() for d in destinations],
        }
    )


def _deliveries(db: Database) -> list[Delivery]:
    with db.session() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path) as server:
        yield server


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'bridge.db'}")
    yield database
    database.dispose()


def _pacs_destination(pacs: OrthancServer) -> DestinationSettings:
    return DestinationSettings(name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)


def test_results_land_in_the_study(tmp_path: Path, pacs: OrthancServer, db: Database) -> None:
    study_id, sources = _make_study(db, tmp_path / "spool")
    for path in sources:
        pacs.upload(path)
    settings = _settings(tmp_path / "data", _pacs_destination(pacs))
    ids = publish_study(db, study_id, settings)
    assert len(ids) == 3  # one SR, one capture per image (negatives annotated by default)
    for output_id in ids:
        with db.session() as session:
            output = session.get(OutputObject, output_id)
            assert output is not None
            assert Path(output.file_path).parent == tmp_path / "data" / "outputs" / STUDY
    counts = deliver_due(db, settings)
    assert counts == {"sent": 3, "retry": 0, "dead": 0}
    assert all(d.state == DeliveryState.SENT and d.sent_at is not None for d in _deliveries(db))

    instances = pacs.instances_of_study(STUDY, tags=True)
    classes = sorted(item["SOPClassUID"] for item in instances)
    assert classes.count(SR_CLASS) == 1 and classes.count(SC_CLASS) == 2 and len(instances) == 5
    descriptions = {item["Tags"].get("SeriesDescription") for item in instances}
    assert {"AI fracture report", "AI fracture overlay"} <= descriptions
    sr_item = next(item for item in instances if item["SOPClassUID"] == SR_CLASS)
    sr = pydicom.dcmread(io.BytesIO(pacs.instance_file(sr_item["ID"])))
    values = _certainties(sr)
    assert values == [93.0, 7.0]
    assert sr.StudyInstanceUID == STUDY and sr.VerificationFlag == "UNVERIFIED"


def _certainties(sr: Dataset) -> list[float]:
    found: list[float] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.get("ValueType") == "NUM" and name == "Certainty of Finding":
                found.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(list(item.get("ContentSequence", [])))

    walk(list(sr.ContentSequence))
    return found


def test_outage_then_recovery_and_no_duplicates(tmp_path: Path, pacs: OrthancServer, db: Database) -> None:
    study_id, _ = _make_study(db, tmp_path / "spool")
    settings = _settings(tmp_path / "data", _pacs_destination(pacs))
    pacs.stop()
    publish_study(db, study_id, settings)

    assert deliver_due(db, settings) == {"sent": 0, "retry": 3, "dead": 0}
    time.sleep(0.3)
    assert deliver_due(db, settings)["retry"] == 3
    deliveries = _deliveries(db)
    assert all(d.state == DeliveryState.PENDING and d.attempts == 2 and d.last_error for d in deliveries)
    assert all("no association" in (d.last_error or "") for d in deliveries)

    pacs.start()
    deadline = time.monotonic() + 10
    sent = 0
    while sent < 3 and time.monotonic() < deadline:
        sent += deliver_due(db, settings)["sent"]
        time.sleep(0.1)
    assert sent == 3
    assert len(pacs.instances_of_study(STUDY)) == 3

    # Analysing again with the same model replaces: same UIDs, same rows, no new instances in the PACS.
    again = publish_study(db, study_id, settings)
    assert sorted(again) == sorted(d.output_id for d in deliveries)
    assert deliver_due(db, settings)["sent"] == 3
    assert len(pacs.instances_of_study(STUDY)) == 3
    with db.session() as session:
        assert len(session.scalars(select(OutputObject)).all()) == 3
        assert len(session.scalars(select(Delivery)).all()) == 3


def test_a_dead_destination_does_not_block_another(tmp_path: Path, pacs: OrthancServer, db: Database) -> None:
    study_id, _ = _make_study(db, tmp_path / "spool")
    refused = DestinationSettings(name="refused", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    # A listener that never answers: the association request times out.
    silent_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent_socket.bind(("127.0.0.1", 0))
    silent_socket.listen(8)
    silent = DestinationSettings(
        name="silent", ae_title="SILENT", host="127.0.0.1", port=silent_socket.getsockname()[1]
    )
    try:
        settings = _settings(tmp_path / "data", refused, silent, _pacs_destination(pacs))
        publish_study(db, study_id, settings)
        started = time.monotonic()
        counts = deliver_due(db, settings)
        elapsed = time.monotonic() - started
    finally:
        silent_socket.close()
    assert counts == {"sent": 3, "retry": 6, "dead": 0}
    assert elapsed < settings.send.timeout * 2 + 5  # destinations run side by side
    by_destination: dict[str, set[DeliveryState]] = {}
    for delivery in _deliveries(db):
        by_destination.setdefault(delivery.destination, set()).add(delivery.state)
    assert by_destination == {
        "pacs": {DeliveryState.SENT},
        "refused": {DeliveryState.PENDING},
        "silent": {DeliveryState.PENDING},
    }
    assert len(pacs.instances_of_study(STUDY)) == 3

    # Past retry_for_hours the failing deliveries become dead letters; resend queues them again.
    later = utcnow() + timedelta(hours=2)
    assert deliver_due(db, _settings(tmp_path / "data", _pacs_destination(pacs)), now=later)["dead"] == 6
    assert {d.state for d in _deliveries(db) if d.destination != "pacs"} == {DeliveryState.DEAD}
    assert resend_study(db, STUDY) == 9
    assert all(d.state == DeliveryState.PENDING and d.attempts == 0 for d in _deliveries(db))


def test_outbox_thread_delivers(tmp_path: Path, pacs: OrthancServer, db: Database) -> None:
    study_id, _ = _make_study(db, tmp_path / "spool")
    settings = _settings(tmp_path / "data", _pacs_destination(pacs))
    outbox = Outbox(db, settings, interval=0.2)
    outbox.start()
    try:
        publish_study(db, study_id, settings)
        outbox.wake()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(pacs.instances_of_study(STUDY)) < 3:
            time.sleep(0.2)
    finally:
        outbox.stop()
    assert len(pacs.instances_of_study(STUDY)) == 3
    assert outbox.totals["sent"] == 3
