"""The spool and the index: durable files, UID checks, rows rebuilt from the spool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from pynetdicom.dsutils import encode
from sqlalchemy import select

from pacs_bridge.errors import RejectedInstance
from pacs_bridge.receive.ingest import STATUS_CANNOT_UNDERSTAND, Ingestor
from pacs_bridge.store.db import open_database
from pacs_bridge.store.models import Instance, Series, Study, StudyState
from pacs_bridge.store.spool import Spool, valid_uid
from tests.support.dicom_files import make_radiograph


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.1", "9" * 64])
def test_valid_uids(uid: str) -> None:
    assert valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1.2.3/4", "../1.2", "1..2", "1.2.a", "9" * 65, None, 12])
def test_invalid_uids_never_reach_a_path(tmp_path: Path, uid: object) -> None:
    assert not valid_uid(uid)
    with pytest.raises(RejectedInstance):
        Spool(tmp_path).path_for(uid, "1.2.3")  # type: ignore[arg-type]


def _ingestor(tmp_path: Path) -> Ingestor:
    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    return Ingestor(Spool(tmp_path, min_free_mb=0), db, max_instance_bytes=10**9)


def test_ingest_indexes_study_series_instance(tmp_path: Path) -> None:
    ingestor = _ingestor(tmp_path)
    study_uid = generate_uid()
    for n in (1, 2):
        ds = make_radiograph(np.zeros((32, 32)), study_uid, instance_number=n, modality="CR")
        raw = encode(ds, False, True)
        outcome = ingestor.ingest(
            ds, (raw,), size=len(raw), transfer_syntax="1.2.840.10008.1.2.1", calling_aet="MOD", source="dicom"
        )
        assert outcome.ok and not outcome.duplicate
    with ingestor.db.sessions() as session:
        study = session.scalars(select(Study)).one()
        assert study.instance_count == 2
        assert study.state == StudyState.RECEIVING
        assert study.modalities == "CR"
        assert study.calling_aet == "MOD"
        assert len(session.scalars(select(Series)).all()) == 2
        assert {i.state.value for i in session.scalars(select(Instance))} == {"pending"}


def test_reconcile_rebuilds_rows_of_spooled_files(tmp_path: Path) -> None:
    ingestor = _ingestor(tmp_path)
    study_uid = generate_uid()
    ds = make_radiograph(np.zeros((32, 32)), study_uid)
    target = ingestor.spool.path_for(study_uid, ds.SOPInstanceUID)
    target.parent.mkdir(parents=True)
    ds.save_as(target, enforce_file_format=True)
    (ingestor.spool.tmp / "partial.part").write_bytes(b"half")
    assert ingestor.spool.clean_tmp() == 1
    assert ingestor.reconcile() == 1
    assert ingestor.reconcile() == 0
    with ingestor.db.sessions() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [ds.SOPInstanceUID]


def test_bad_uid_is_refused_before_any_file(tmp_path: Path) -> None:
    ingestor = _ingestor(tmp_path)
    ds = make_radiograph(np.zeros((32, 32)), generate_uid())
    ds.SeriesInstanceUID = "1.2.x"
    outcome = ingestor.ingest(
        ds, (b"data",), size=4, transfer_syntax="1.2.840.10008.1.2.1", calling_aet=None, source="folder"
    )
    assert outcome.status == STATUS_CANNOT_UNDERSTAND
    assert "SeriesInstanceUID" in outcome.message
    assert list(ingestor.spool.files()) == []


def test_broken_index_connection_refuses_one_store_then_recovers(tmp_path: Path) -> None:
    """The held index connection breaks: that store is not acknowledged, the next one opens a new connection."""
    ingestor = _ingestor(tmp_path)
    study_uid = generate_uid()

    def store(n: int) -> int:
        ds = make_radiograph(np.zeros((32, 32)), study_uid, instance_number=n)
        raw = encode(ds, False, True)
        outcome = ingestor.ingest(
            ds, (raw,), size=len(raw), transfer_syntax="1.2.840.10008.1.2.1", calling_aet="MOD", source="dicom"
        )
        assert outcome.retryable or outcome.ok
        return outcome.status

    assert store(1) == 0
    held = ingestor._conn
    assert held is not None
    held.connection.dbapi_connection.close()  # type: ignore[union-attr]
    assert store(2) == 0xA700  # out of resources: the sender tries again
    assert store(3) == 0 and store(4) == 0
    with ingestor.db.sessions() as session:
        assert sorted(i.instance_number for i in session.scalars(select(Instance))) == [1, 3, 4]
    assert len(list(ingestor.spool.files())) == 3  # the refused store left no file behind
    ingestor.close()
    assert ingestor._conn is None


def test_index_finds_study_and_series_another_writer_added(tmp_path: Path) -> None:
    """A second index (another process, or this one after a restart) adds into rows it has not cached."""
    from pacs_bridge.store.index import FastIndex, InstanceRecord

    db = open_database(f"sqlite:///{tmp_path / 'index.db'}")
    study, series = generate_uid(), generate_uid()

    def record(sop: str) -> InstanceRecord:
        return InstanceRecord(
            study,
            series,
            sop,
            "1.2.840.10008.5.1.4.1.1.1.1",
            "1.2.840.10008.1.2.1",
            Path(f"{sop}.dcm"),
            1,
            "A",
            "dicom",
        )

    for index in (FastIndex(), FastIndex()):
        with db.engine.connect() as conn, conn.begin():
            assert index.add(conn, record(generate_uid())).new
    with db.sessions() as session:
        assert len(session.scalars(select(Study)).all()) == 1
        assert len(session.scalars(select(Series)).all()) == 1
        instances = session.scalars(select(Instance)).all()
        assert len(instances) == 2 and instances[0].series_id == instances[1].series_id
    db.engine.dispose()
