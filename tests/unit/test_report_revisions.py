"""Revisions of a study's result, through the database: same content same UIDs, changed content a new revision."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_bridge.config import Settings
from pacs_bridge.report.publish import Publication, publish_study, record_outputs
from pacs_bridge.store.db import Database, open_database
from pacs_bridge.store.models import Instance, InstanceResult, OutputObject, ResultRevision, Series, Study
from tests.support.dicom_files import make_radiograph
from tests.support.paths import FRACATLAS

IMAGES = ["images/Fractured/IMG0000019.jpg", "images/Non_fractured/IMG0000001.jpg", "images/Fractured/IMG0000025.jpg"]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY = "1.2.826.0.1.3680043.8.498.777.9"


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")}})


def _add_image(db: Database, folder: Path, number: int, *, probability: float, ok: bool = True) -> str:
    """One radiograph on disk and its analysis result in the database; its SOP Instance UID."""
    path = folder / f"{number}.dcm"
    series_uid = "1.2.826.0.1.3680043.8.498.777.9.1"
    ds = make_radiograph(
        FRACATLAS / IMAGES[number - 1], STUDY, series_uid=series_uid, instance_number=number, path=path
    )
    created = datetime(2026, 1, 5, 10, 0, tzinfo=UTC) + timedelta(minutes=number)
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == STUDY))
        if study is None:
            study = Study(study_instance_uid=STUDY)
            session.add(study)
            session.flush()
        series = session.scalar(select(Series).where(Series.series_instance_uid == series_uid))
        if series is None:
            series = Series(series_instance_uid=series_uid, study_id=study.id, modality="DX")
            session.add(series)
            session.flush()
        instance = Instance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_id=study.id,
            series_id=series.id,
            instance_number=number,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            file_path=str(path),
            size_bytes=path.stat().st_size,
        )
        session.add(instance)
        session.flush()
        result = InstanceResult(
            instance_id=instance.id, model_name="fracatlas-cnn", model_version="1.2.0", ok=ok, created_at=created
        )
        if ok:
            result.probability = probability
            result.fracture = probability >= 0.5
            result.threshold = 0.5
            result.box = [221, 165, 270, 192] if probability >= 0.5 else None
        else:
            result.error = "pixel data could not be decoded"
        session.add(result)
    return str(ds.SOPInstanceUID)


def _study_id(db: Database) -> int:
    with db.session() as session:
        return int(session.scalars(select(Study.id)).one())


def _publish(db: Database, settings: Settings) -> Publication:
    publication = publish_study(db, _study_id(db), settings)
    with db.session() as session:
        record_outputs(session, _study_id(db), publication, settings.storage.data_dir)
    return publication


def _uids(publication: Publication) -> set[str]:
    return {item.sop_instance_uid for item in publication.objects}


def _sr(publication: Publication) -> pydicom.Dataset:
    (item,) = [w for w in publication.objects if w.kind == "sr"]
    return pydicom.dcmread(item.path)


def test_same_content_gives_the_same_objects(tmp_path: Path, db: Database, settings: Settings) -> None:
    _add_image(db, tmp_path, 1, probability=0.93)
    _add_image(db, tmp_path, 2, probability=0.07)
    first = _publish(db, settings)
    assert {w.kind for w in first.objects} == {"sr", "capture", "gsps", "summary", "result"}
    assert len(first.objects) == 7  # SR, 2 captures, 2 presentation states, 1 summary, the result document
    first_bytes = {w.sop_instance_uid: w.path.read_bytes() for w in first.objects}
    again = _publish(db, settings)
    assert _uids(again) == _uids(first)
    assert again.revision is not None and again.revision.number == 1
    # A rebuild writes the same bytes: the time in every object is the content's, not the build's.
    assert {w.sop_instance_uid: w.path.read_bytes() for w in again.objects} == first_bytes
    with db.session() as session:
        assert session.scalars(select(ResultRevision)).all().__len__() == 1
        assert not any(o.superseded for o in session.scalars(select(OutputObject)))


def test_a_late_image_makes_a_new_revision(tmp_path: Path, db: Database, settings: Settings) -> None:
    _add_image(db, tmp_path, 1, probability=0.93)
    _add_image(db, tmp_path, 2, probability=0.07)
    first = _publish(db, settings)
    old_sr = _sr(first)
    _add_image(db, tmp_path, 3, probability=0.81)
    second = _publish(db, settings)
    assert second.revision is not None and second.revision.number == 2
    assert not _uids(first) & _uids(second), "a new revision shares no SOP Instance UID with the old one"
    new_sr = _sr(second)
    assert new_sr.SeriesInstanceUID != old_sr.SeriesInstanceUID
    assert int(new_sr.SeriesNumber) == int(old_sr.SeriesNumber) + 10
    assert int(new_sr.InstanceNumber) == 2
    assert new_sr.SeriesDescription.endswith("revision 2")
    assert (new_sr.ContentDate + new_sr.ContentTime) > (old_sr.ContentDate + old_sr.ContentTime)
    predecessor = new_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.SeriesInstanceUID == old_sr.SeriesInstanceUID
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert (
        len(new_sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence) == 3
    )
    series = {w.kind: w.series_instance_uid for w in second.objects}
    assert not set(series.values()) & {w.series_instance_uid for w in first.objects}
    with db.session() as session:
        rows = {o.sop_instance_uid: o.superseded for o in session.scalars(select(OutputObject))}
    assert all(rows[uid] for uid in _uids(first))
    assert not any(rows[uid] for uid in _uids(second))
    # Unchanged again: revision 2 rebuilt, nothing new.
    third = _publish(db, settings)
    assert _uids(third) == _uids(second)


def test_a_failed_image_is_content_and_the_summary_names_it(tmp_path: Path, db: Database, settings: Settings) -> None:
    _add_image(db, tmp_path, 1, probability=0.07)
    first = _publish(db, settings)
    _add_image(db, tmp_path, 2, probability=0.0, ok=False)
    second = _publish(db, settings)
    assert second.revision is not None and second.revision.number == 2
    (summary,) = [pydicom.dcmread(w.path) for w in second.objects if w.kind == "summary"]
    assert "not analysed: pixel data could not be decoded" in summary.ImageComments
    assert "no fracture detected by the model" in summary.ImageComments
    assert _uids(first) != _uids(second)


def test_sr_parses_with_highdicom_and_names_its_companions(tmp_path: Path, db: Database, settings: Settings) -> None:
    sops = [_add_image(db, tmp_path, 1, probability=0.93), _add_image(db, tmp_path, 2, probability=0.07)]
    publication = _publish(db, settings)
    sr = hd.sr.srread(_sr(publication).filename)
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = [*report.get_planar_roi_measurement_groups(), *report.get_image_measurement_groups()]
    assert len(groups) == 2
    by_source: dict[str, float] = {}
    for group in groups:
        (certainty,) = group.get_measurements(name=hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding"))
        (source,) = certainty.referenced_images
        by_source[source.referenced_sop_instance_uid] = certainty.value
    assert by_source == {sops[0]: 93.0, sops[1]: 7.0}
    companions = {
        ref.ReferencedSOPInstanceUID
        for study in sr.PertinentOtherEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert companions == {w.sop_instance_uid for w in publication.objects if w.kind not in ("sr", "result")}
    gsps = {w.sop_instance_uid for w in publication.objects if w.kind == "gsps"}
    assert gsps and {uid for uid in gsps} == {
        item.ReferencedSOPSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in _num_sources(_sr(publication))
    }


def _num_sources(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    found: list[pydicom.Dataset] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "111012":
                found.extend(child for child in item.ContentSequence if child.ValueType == "IMAGE")
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_a_new_model_version_is_a_new_revision(tmp_path: Path, db: Database, settings: Settings) -> None:
    _add_image(db, tmp_path, 1, probability=0.93)
    first = _publish(db, settings)
    with db.session() as session:
        for result in session.scalars(select(InstanceResult)):
            session.add(
                InstanceResult(
                    instance_id=result.instance_id,
                    model_name="fracatlas-cnn",
                    model_version="1.3.0",
                    ok=True,
                    probability=0.91,
                    fracture=True,
                    threshold=0.5,
                    created_at=datetime(2026, 2, 1, tzinfo=UTC),
                )
            )
    second = _publish(db, settings)
    assert second.revision is not None and second.revision.number == 2
    assert generate_uid() not in _uids(second)
    assert not _uids(first) & _uids(second)


def test_non_conformant_copied_attributes_still_give_every_result_object(
    tmp_path: Path, db: Database, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Values outside their VR or enumerated values (as PACSs do hold) are left empty, never a failed publish."""
    _add_image(db, tmp_path, 1, probability=0.93)
    path = tmp_path / "1.dcm"
    ds = pydicom.dcmread(path)
    bad = {
        "PatientBirthDate": "1970-01-01 SECRETDOB",
        "StudyTime": "25:99",
        "PatientSex": "X",
        "SpecificCharacterSet": "ISO_IR 999",
        "AccessionNumber": "A" * 40,
    }
    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for keyword, value in bad.items():
            setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = mode
    publication = _publish(db, settings)
    assert {w.kind for w in publication.objects} == {"sr", "capture", "gsps", "summary", "result"}
    sr = _sr(publication)
    assert sr.PatientBirthDate == "" and sr.StudyTime == "" and sr.PatientSex == ""
    # Only keywords are logged, never the values (pydicom's own reader warnings are redacted by the service's
    # log set-up, tested with the running service).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pacs_bridge"))
    assert "PatientBirthDate" in ours and "SECRETDOB" not in ours
