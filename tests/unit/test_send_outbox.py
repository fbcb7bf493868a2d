"""Outbox bookkeeping without a network: backoff, dead letters, resend, path safety."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_bridge.config import Settings
from pacs_bridge.report.publish import output_path
from pacs_bridge.report.uids import instance_uid, is_valid_uid, series_uid
from pacs_bridge.send.outbox import backoff_seconds, deliver_due, resend_study
from pacs_bridge.store.db import Database, open_database
from pacs_bridge.store.models import Delivery, DeliveryState, OutputObject, Study, utcnow


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_seconds(n, 30, 1800) for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert backoff_seconds(10, 30, 1800) == 1800
    assert backoff_seconds(500, 30, 1800) == 1800


def test_uids_are_valid_and_stable() -> None:
    study = "1.2.3.4"
    assert instance_uid(study, "m", "1", "sr") == instance_uid(study, "m", "1", "sr")
    assert instance_uid(study, "m", "1", "capture", "1.2.3.4.5") != instance_uid(
        study, "m", "1", "capture", "1.2.3.4.6"
    )
    assert instance_uid(study, "m", "1", "sr") != instance_uid(study, "m", "2", "sr")
    assert series_uid(study, "m", "1", "sr") != series_uid(study, "m", "1", "capture")
    for uid in (instance_uid(study, "m", "1", "sr"), instance_uid(study, "m", "1", "sr", root="1.2.826.0.1.99")):
        assert is_valid_uid(uid) and len(uid) <= 64
    assert not is_valid_uid("1.2.03")
    assert not is_valid_uid("../1.2")


def test_output_path_refuses_bad_uids(tmp_path: Path) -> None:
    assert output_path(tmp_path, "1.2.3", "1.2.3.4") == tmp_path / "outputs" / "1.2.3" / "1.2.3.4.dcm"
    for study, sop in (("../etc", "1.2"), ("1.2", "1.2/../../x"), ("1.2", "")):
        with pytest.raises(ValueError):
            output_path(tmp_path, study, sop)


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'bridge.db'}")
    yield database
    database.dispose()


def _queue(db: Database, tmp_path: Path, destination: str, file_exists: bool = True) -> int:
    path = tmp_path / "out.dcm"
    if file_exists:
        path.write_bytes(b"not sent anyway")
    with db.session() as session:
        study = Study(study_instance_uid="1.2.3")
        session.add(study)
        session.flush()
        output = OutputObject(
            study_id=study.id,
            kind="sr",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            sop_instance_uid="1.2.3.9",
            series_instance_uid="1.2.3.8",
            file_path=str(path),
        )
        session.add(output)
        session.flush()
        delivery = Delivery(output_id=output.id, destination=destination)
        session.add(delivery)
        session.flush()
        return delivery.id


def test_unconfigured_destination_retries_then_dies(tmp_path: Path, db: Database) -> None:
    settings = Settings.model_validate({"send": {"retry_initial_seconds": 10, "retry_for_hours": 1}})
    delivery_id = _queue(db, tmp_path, "gone")
    now = utcnow()
    assert deliver_due(db, settings, now=now) == {"sent": 0, "retry": 1, "dead": 0}
    assert deliver_due(db, settings, now=now + timedelta(seconds=5)) == {"sent": 0, "retry": 0, "dead": 0}
    assert deliver_due(db, settings, now=now + timedelta(seconds=11))["retry"] == 1
    with db.session() as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        assert delivery.attempts == 2 and "not configured" in (delivery.last_error or "")
    assert deliver_due(db, settings, now=now + timedelta(hours=2))["dead"] == 1
    assert resend_study(db, "1.2.3") == 1
    with db.session() as session:
        delivery = session.scalars(select(Delivery)).one()
        assert delivery.state == DeliveryState.PENDING and delivery.attempts == 0 and delivery.last_error is None
    with pytest.raises(LookupError):
        resend_study(db, "9.9.9")


def test_missing_file_is_a_dead_letter_at_once(tmp_path: Path, db: Database) -> None:
    settings = Settings.model_validate(
        {"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}]}
    )
    _queue(db, tmp_path, "pacs", file_exists=False)
    assert deliver_due(db, settings) == {"sent": 0, "retry": 0, "dead": 1}


def test_resend_adds_new_destinations(tmp_path: Path, db: Database) -> None:
    _queue(db, tmp_path, "pacs")
    assert resend_study(db, "1.2.3", destinations=["pacs", "archive"]) == 2
    with db.session() as session:
        assert sorted(d.destination for d in session.scalars(select(Delivery))) == ["archive", "pacs"]
