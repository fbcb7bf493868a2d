"""Turn a study's analysis results into DICOM objects on disk and outbox rows.

For each analysed study: one Comprehensive 3D SR (:mod:`pacs_bridge.report.sr`)
and, per analysed image, one annotated Secondary Capture
(:mod:`pacs_bridge.report.capture`). Each object is written durably
(temporary file, fsync, rename, fsync of the folder) to
``<data_dir>/outputs/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` as a DICOM
Part 10 file (PS3.10), recorded as an ``OutputObject`` and queued for every
configured destination as a ``Delivery`` (sent by :mod:`pacs_bridge.send.outbox`).

Because the UIDs are deterministic, publishing again with the same model
replaces the file, reuses the ``OutputObject`` row and resets its deliveries
to pending, so the PACS receives the same SOP Instance again rather than a
second copy.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_bridge.config import Settings
from pacs_bridge.report.capture import build_capture
from pacs_bridge.report.findings import FindingInput, ModelInfo
from pacs_bridge.report.sr import build_sr
from pacs_bridge.report.uids import is_valid_uid
from pacs_bridge.store.db import Database
from pacs_bridge.store.layout import relative_to_data
from pacs_bridge.store.models import Instance, InstanceResult, OutputObject, Study, utcnow

__all__ = [
    "KIND_CAPTURE",
    "KIND_SR",
    "Written",
    "output_path",
    "publish_study",
    "record_outputs",
    "write_dataset",
]

LOGGER = logging.getLogger(__name__)

KIND_SR = "sr"
KIND_CAPTURE = "capture"


@dataclass(frozen=True)
class _Analysed:
    """One instance's newest successful result, read from the database."""

    file_path: str
    finding: FindingInput
    heatmap_path: str | None


def output_path(data_dir: Path, study_uid: str, sop_instance_uid: str) -> Path:
    """Where an output object is kept; both UIDs are validated so no dataset value can escape ``data_dir``."""
    for uid in (study_uid, sop_instance_uid):
        if not is_valid_uid(uid):
            raise ValueError(f"refusing to use {uid!r} in a path: not a valid UID")
    return Path(data_dir) / "outputs" / study_uid / f"{sop_instance_uid}.dcm"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dataset(dataset: Dataset, path: Path, *, fsync: bool = True) -> None:
    """Write a Part 10 file (PS3.10) so that ``path`` holds either the old or the complete new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            dataset.save_as(stream, enforce_file_format=True)
            stream.flush()
            if fsync:
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _load_heatmap(path: str | None, sop_instance_uid: str) -> npt.NDArray[np.float32] | None:
    if not path:
        return None
    try:
        heatmap = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        LOGGER.warning("heatmap of %s unreadable (%s); drawing without it", sop_instance_uid, exc)
        return None
    if heatmap.ndim != 2:
        LOGGER.warning("heatmap of %s has shape %s, not 2-D; drawing without it", sop_instance_uid, heatmap.shape)
        return None
    return np.asarray(heatmap, dtype=np.float32)


def _read_results(db: Database, study_id: int) -> tuple[str, ModelInfo | None, list[_Analysed]]:
    """The study UID, the model of the newest result and each instance's result by that model."""
    with db.session() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise LookupError(f"no study with id {study_id}")
        rows = session.execute(
            select(Instance, InstanceResult)
            .join(InstanceResult, InstanceResult.instance_id == Instance.id)
            .where(Instance.study_id == study_id)
            .order_by(InstanceResult.created_at.desc(), InstanceResult.id.desc())
        ).all()
        if not rows:
            return study.study_instance_uid, None, []
        newest = rows[0][1]
        model_key = (newest.model_name, newest.model_version)
        chosen: dict[int, tuple[Instance, InstanceResult]] = {}
        for instance, result in rows:
            if (result.model_name, result.model_version) == model_key and instance.id not in chosen:
                chosen[instance.id] = (instance, result)
        ordered = sorted(chosen.values(), key=lambda pair: (pair[0].instance_number or 0, pair[0].id))
        threshold = next((r.threshold for _, r in ordered if r.threshold is not None), 0.5)
        model = ModelInfo(name=model_key[0], version=model_key[1], threshold=float(threshold))
        analysed: list[_Analysed] = []
        for instance, result in ordered:
            if not result.ok or result.probability is None:
                continue
            box = tuple(float(v) for v in result.box) if result.box and len(result.box) == 4 else None
            finding = FindingInput(
                sop_instance_uid=instance.sop_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                probability=float(result.probability),
                fracture=bool(result.fracture)
                if result.fracture is not None
                else result.probability >= (result.threshold if result.threshold is not None else model.threshold),
                threshold=float(result.threshold if result.threshold is not None else model.threshold),
                body_part=result.body_part,
                box=box,  # type: ignore[arg-type]
            )
            analysed.append(_Analysed(instance.file_path, finding, result.heatmap_path))
        return study.study_instance_uid, model, analysed


@dataclass(frozen=True)
class Written:
    """One result object written to the outputs folder, not yet recorded."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path

    @classmethod
    def of(cls, kind: str, dataset: Dataset, path: Path) -> Written:
        """The record of a DICOM object written at ``path``."""
        return cls(
            kind, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), str(dataset.SeriesInstanceUID), path
        )


def record_outputs(session: Session, study_id: int, written: list[Written], data_dir: Path) -> list[OutputObject]:
    """Upsert the ``OutputObject`` rows of ``written`` in the caller's transaction; returns the rows.

    Paths are stored relative to ``data_dir`` so that nodes sharing the data
    folder may mount it in different places.
    """
    now = utcnow()
    rows: list[OutputObject] = []
    for item in written:
        output = session.scalars(
            select(OutputObject).where(OutputObject.sop_instance_uid == item.sop_instance_uid)
        ).first()
        if output is None:
            output = OutputObject(study_id=study_id, sop_instance_uid=item.sop_instance_uid)
            session.add(output)
        output.kind = item.kind
        output.sop_class_uid = item.sop_class_uid
        output.series_instance_uid = item.series_instance_uid
        output.file_path = relative_to_data(item.path, data_dir)
        output.created_at = now
        output.superseded = False
        rows.append(output)
    session.flush()
    return rows


def publish_study(db: Database, study_id: int, settings: Settings) -> list[Written]:
    """Build and write the result objects of study ``study_id``; returns what was written.

    The caller (the publish stage) records them with :func:`record_outputs`
    and queues their deliveries in the transaction that completes its job.

    Uses each instance's newest result by the model of the study's newest
    result; failed analyses (``ok`` false) are left out. An image whose
    annotated capture cannot be built is logged and skipped; the SR is still
    produced. Returns an empty list when there is nothing to report.
    """
    report = settings.report
    study_uid, model, analysed = _read_results(db, study_id)
    if model is None or not analysed:
        LOGGER.info("study %s: no successful analysis, nothing to publish", study_uid)
        return []
    if not is_valid_uid(study_uid):
        raise ValueError(f"study {study_id}: Study Instance UID {study_uid!r} is not valid")
    data_dir = settings.storage.data_dir
    written: list[Written] = []

    if report.structured_report:
        headers: list[Dataset] = []
        findings: list[FindingInput] = []
        for item in analysed:
            try:
                headers.append(pydicom.dcmread(item.file_path, stop_before_pixels=True))
            except Exception as exc:  # a vanished or damaged source drops that image only
                LOGGER.warning("study %s: source %s unreadable (%s)", study_uid, item.finding.sop_instance_uid, exc)
                continue
            findings.append(item.finding)
        if findings:
            sr = build_sr(headers, findings, model, report)
            path = output_path(data_dir, study_uid, str(sr.SOPInstanceUID))
            write_dataset(sr, path, fsync=settings.storage.fsync)
            written.append(Written.of(KIND_SR, sr, path))

    if report.annotated_image:
        for item in analysed:
            if not item.finding.fracture and not report.annotate_negatives:
                continue
            try:
                source = pydicom.dcmread(item.file_path)
                heatmap = _load_heatmap(item.heatmap_path, item.finding.sop_instance_uid)
                finding = item.finding
                if heatmap is not None:
                    finding = replace(finding, heatmap=heatmap)
                capture = build_capture(source, finding, model, report)
            except Exception as exc:  # one bad image must not stop the study's report
                LOGGER.warning(
                    "study %s: no annotated image for %s (%s: %s)",
                    study_uid,
                    item.finding.sop_instance_uid,
                    type(exc).__name__,
                    exc,
                )
                continue
            path = output_path(data_dir, study_uid, str(capture.SOPInstanceUID))
            write_dataset(capture, path, fsync=settings.storage.fsync)
            written.append(Written.of(KIND_CAPTURE, capture, path))

    LOGGER.info("study %s: built %d result object(s) by %s", study_uid, len(written), model.label)
    return written
