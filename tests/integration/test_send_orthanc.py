"""Results reach a real PACS (Orthanc): same study, right content, retries through an outage, no duplicates."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from pacs_bridge.config import DICOM_KINDS, DestinationSettings, Settings
from pacs_bridge.health import Health
from pacs_bridge.pipeline.actions import resend
from pacs_bridge.pipeline.publishing import PublishStage
from pacs_bridge.pipeline.runner import StageRunner
from pacs_bridge.send.deliver import DeliverStage
from pacs_bridge.store.db import Database, open_database
from pacs_bridge.store.models import (
    Instance,
    InstanceResult,
    Job,
    JobKind,
    JobState,
    OutputObject,
    Series,
    Study,
    StudyState,
)
from tests.support.dicom_files import make_radiograph
from tests.support.orthanc import OrthancServer, free_port, orthanc_available
from tests.support.paths import FRACATLAS as FRACATLAS_ROOT
from tests.support.pipeline import jobs_of_kind, queue_job, run_round

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
        study = Study(
            study_instance_uid=STUDY,
            patient_id="PB-TEST-0001",
            accession_number="ACC0001",
            state=StudyState.ANALYSING,
        )
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


def _deliveries(db: Database) -> list[Job]:
    return jobs_of_kind(db, JobKind.DELIVER)


def _publish(db: Database, study_id: int, settings: Settings) -> list[int]:
    """Run the publish stage for the study; returns the ids of its DICOM output objects (what a PACS receives)."""
    queue_job(db, JobKind.PUBLISH, study_id=study_id)
    assert run_round(PublishStage(settings, db), db) == 1
    with db.session() as session:
        return list(
            session.scalars(
                select(OutputObject.id).where(OutputObject.study_id == study_id, OutputObject.kind.in_(DICOM_KINDS))
            )
        )


def _deliver(db: Database, settings: Settings) -> dict[str, int]:
    """One delivery round; counts of jobs sent, to retry and dead after it."""
    before = {job.id for job in _deliveries(db) if job.state == JobState.DONE}
    run_round(DeliverStage(settings, db), db)
    jobs = _deliveries(db)
    return {
        "sent": sum(1 for job in jobs if job.state == JobState.DONE and job.id not in before),
        "retry": sum(1 for job in jobs if job.state == JobState.PENDING and job.attempts > 0),
        "dead": sum(1 for job in jobs if job.state == JobState.DEAD),
    }


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
    ids = _publish(db, study_id, settings)
    assert len(ids) >= 3  # one SR, one capture per image (negatives annotated by default), ...
    for output_id in ids:
        with db.session() as session:
            output = session.get(OutputObject, output_id)
            assert output is not None
            # Stored relative to the data folder, so that nodes may mount it in different places.
            assert Path(output.file_path).parent == Path("outputs") / STUDY
    with db.session() as session:
        assert session.get(Study, study_id).state == StudyState.DONE  # type: ignore[union-attr]
    counts = _deliver(db, settings)
    assert counts == {"sent": len(ids), "retry": 0, "dead": 0}
    assert all(d.state == JobState.DONE and d.finished_at is not None for d in _deliveries(db))

    instances = pacs.instances_of_study(STUDY, tags=True)
    classes = sorted(item["SOPClassUID"] for item in instances)
    assert classes.count(SR_CLASS) == 1 and classes.count(SC_CLASS) >= 2 and len(instances) == 2 + len(ids)
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
    ids = _publish(db, study_id, settings)
    count = len(ids)

    assert _deliver(db, settings) == {"sent": 0, "retry": count, "dead": 0}
    time.sleep(0.3)
    assert _deliver(db, settings)["retry"] == count
    deliveries = _deliveries(db)
    assert all(d.state == JobState.PENDING and d.attempts == 2 and d.last_error for d in deliveries)
    assert all("no association" in (d.last_error or "") for d in deliveries)

    pacs.start()
    deadline = time.monotonic() + 10
    sent = 0
    while sent < count and time.monotonic() < deadline:
        sent += _deliver(db, settings)["sent"]
        time.sleep(0.1)
    assert sent == count
    assert len(pacs.instances_of_study(STUDY)) == count

    # Publishing the same results again (a crash-retry): same UIDs, same rows, no new instances in the PACS.
    with db.session() as session:
        session.get(Study, study_id).state = StudyState.ANALYSING  # type: ignore[union-attr]
    again = _publish(db, study_id, settings)
    assert sorted(again) == sorted(ids)
    _deliver(db, settings)
    assert len(pacs.instances_of_study(STUDY)) == count
    with db.session() as session:
        assert len(session.scalars(select(OutputObject).where(OutputObject.kind.in_(DICOM_KINDS))).all()) == count


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
        count = len(_publish(db, study_id, settings))
        counts = _deliver(db, settings)
    finally:
        silent_socket.close()
    assert counts == {"sent": count, "retry": 2 * count, "dead": 0}
    by_destination: dict[str, set[JobState]] = {}
    for delivery in _deliveries(db):
        by_destination.setdefault(delivery.destination or "", set()).add(delivery.state)
    assert by_destination == {
        "pacs": {JobState.DONE},
        "refused": {JobState.PENDING},
        "silent": {JobState.PENDING},
    }
    assert len(pacs.instances_of_study(STUDY)) == count

    # Past retry_for_hours the failing deliveries become dead letters and the study is failed;
    # resend queues them again.
    quick = _settings(tmp_path / "data", refused, _pacs_destination(pacs)).model_copy(deep=True)
    quick.send.retry_for_hours = 0.0001
    quick.send.timeout = 1.0
    time.sleep(0.5)
    _deliver(db, quick)
    dead = {d.destination for d in _deliveries(db) if d.state == JobState.DEAD}
    assert dead >= {"refused"}
    with db.session() as session:
        study = session.get(Study, study_id)
        assert study is not None and study.state == StudyState.FAILED
        assert "could not be delivered to" in (study.state_reason or "")
    queued = resend(db, quick, STUDY)
    assert queued == 2 * count  # refused and pacs, each every object
    pending = [d for d in _deliveries(db) if d.state == JobState.PENDING and d.attempts == 0]
    assert len(pending) >= count


def test_send_stage_thread_delivers(tmp_path: Path, pacs: OrthancServer, db: Database) -> None:
    study_id, _ = _make_study(db, tmp_path / "spool")
    settings = _settings(tmp_path / "data", _pacs_destination(pacs))
    health = Health("test")
    runner = StageRunner(DeliverStage(settings, db), db, health, owner="test:1", lease_seconds=30, poll_seconds=0.2)
    runner.start()
    try:
        count = len(_publish(db, study_id, settings))
        runner.wake()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(pacs.instances_of_study(STUDY)) < count:
            time.sleep(0.2)
        assert health.report().ok
    finally:
        runner.stop()
    assert len(pacs.instances_of_study(STUDY)) == count
    assert runner.completed == count
