"""Turn a study's analysis results into DICOM objects on disk and output rows.

For each analysed study, one *revision* (:mod:`pacs_bridge.report.revision`)
of: per analysed image an annotated Secondary Capture
(:mod:`pacs_bridge.report.capture`) and a Grayscale Softcopy Presentation
State (:mod:`pacs_bridge.report.gsps`); one study summary
(:mod:`pacs_bridge.report.summary`); and one Comprehensive 3D SR
(:mod:`pacs_bridge.report.sr`) that references the others. Each object is
written durably (temporary file, fsync, rename, fsync of the folder) to
``<data_dir>/outputs/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` as a DICOM
Part 10 file (PS3.10), then recorded as an ``OutputObject``
(:func:`record_outputs`) in the publish stage's transaction.

Revisions are kept in ``result_revisions``. Publishing content equal to the
newest revision's rebuilds that revision: the same UIDs, numbers and times,
so a resend or a retry after a crash gives the PACS nothing new. Changed
content (a late instance, a new model, a failed image) makes the next
revision: new SOP Instance and Series UIDs, Series Numbers 10 higher, a
later content time, the SR listing the previous SR as its predecessor; the
previous revision's output rows are marked superseded, so they are not sent
again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_bridge.config import Settings
from pacs_bridge.imaging.dicom import decode
from pacs_bridge.report import gsps as gsps_module
from pacs_bridge.report import summary as summary_module
from pacs_bridge.report.capture import build_capture
from pacs_bridge.report.findings import FailedImage, FindingInput, ModelInfo
from pacs_bridge.report.gsps import build_gsps
from pacs_bridge.report.headers import make_conformant
from pacs_bridge.report.revision import PROBABILITY_DECIMALS, PriorObject, Revision, content_digest, revision_digest
from pacs_bridge.report.sr import build_sr
from pacs_bridge.report.study_result import ImageFinding, NotAnalysed, StudyResult, build_study_result
from pacs_bridge.report.summary import SummaryImage, build_summary
from pacs_bridge.report.uids import content_series_uid, content_uid, is_valid_uid
from pacs_bridge.store.db import Database
from pacs_bridge.store.layout import relative_to_data, resolve_stored
from pacs_bridge.store.models import Instance, InstanceResult, OutputObject, ResultRevision, Study, utcnow

__all__ = [
    "KIND_CAPTURE",
    "KIND_GSPS",
    "KIND_SR",
    "KIND_SUMMARY",
    "Publication",
    "Written",
    "output_path",
    "publish_study",
    "record_outputs",
    "write_dataset",
]

LOGGER = logging.getLogger(__name__)

KIND_SR = "sr"
KIND_CAPTURE = "capture"
KIND_GSPS = gsps_module.KIND
KIND_SUMMARY = summary_module.KIND
KIND_RESULT = "result"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
"""Comprehensive 3D SR Storage (PS3.4 B.5), the class of every SR this package writes."""


@dataclass(frozen=True)
class _Analysed:
    """One instance's newest successful result, read from the database."""

    file_path: str
    finding: FindingInput
    heatmap_path: str | None
    instance_number: int | None = None


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


def _write_replacing(path: Path, write: Callable[[BinaryIO], object], *, fsync: bool) -> None:
    """Write ``path`` through a temporary file and a rename, so that it holds either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            if fsync:
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def write_dataset(dataset: Dataset, path: Path, *, fsync: bool = True) -> None:
    """Write a Part 10 file (PS3.10) so that ``path`` holds either the old or the complete new file."""
    _write_replacing(path, lambda stream: dataset.save_as(stream, enforce_file_format=True), fsync=fsync)


def write_document(text: str, path: Path, *, fsync: bool = True) -> None:
    """Write a text document (the study result JSON, UTF-8) the same way."""
    _write_replacing(path, lambda stream: stream.write(text.encode("utf-8")), fsync=fsync)


def _text(source: Dataset, keyword: str) -> str | None:
    value = source.get(keyword)
    return str(value) if value not in (None, "") else None


def _result_document(
    headers: list[Dataset],
    findings: list[FindingInput],
    results: _StudyResults,
    model: ModelInfo,
    revision: Revision,
    sr: Written | None,
) -> StudyResult:
    """The study result that RIS messages and webhooks are built from (:mod:`pacs_bridge.report.study_result`).

    Identifiers come from the first source header (PS3.3 C.7.1.1 Patient
    Module, C.7.2.1 General Study Module); its time is the revision's content
    time, so the same content gives the same document byte for byte.
    """
    first = headers[0]
    items = [
        ImageFinding(
            sop_instance_uid=f.sop_instance_uid,
            series_instance_uid=str(h.SeriesInstanceUID),
            probability=round(float(f.probability), PROBABILITY_DECIMALS),
            fracture=f.fracture,
            body_part=f.body_part,
            boxes=f.boxes,
        )
        for h, f in zip(headers, findings, strict=True)
    ]
    modalities = sorted({str(h.get("Modality") or "") for h in headers} - {""})
    return build_study_result(
        study_instance_uid=results.study_uid,
        model_name=model.name,
        model_version=model.version,
        threshold=model.threshold,
        findings=items,
        not_analysed=[NotAnalysed(f.sop_instance_uid, f.reason) for f in results.failed],
        accession_number=_text(first, "AccessionNumber"),
        patient_id=_text(first, "PatientID"),
        patient_name=_text(first, "PatientName"),
        study_date=_text(first, "StudyDate"),
        study_description=_text(first, "StudyDescription"),
        modalities=modalities,
        calling_aet=results.calling_aet,
        sr_sop_instance_uid=sr.sop_instance_uid if sr else None,
        sr_series_instance_uid=sr.series_instance_uid if sr else None,
        created_at=revision.content_datetime,
        revision=revision.number,
    )


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


def _aware(moment: datetime) -> datetime:
    """Stored times are UTC; SQLite hands them back without a zone."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass
class _StudyResults:
    """A study's newest results by one model, read from the database."""

    study_uid: str
    model: ModelInfo | None = None
    analysed: list[_Analysed] = field(default_factory=list)
    failed: list[FailedImage] = field(default_factory=list)
    newest: datetime | None = None
    calling_aet: str | None = None


def _boxes(result: InstanceResult) -> tuple[tuple[float, float, float, float], ...]:
    boxes = []
    for item in result.boxes or ():
        value = item.get("box") if isinstance(item, dict) else None
        if value and len(value) == 4 and value[2] > value[0] and value[3] > value[1]:
            boxes.append((float(value[0]), float(value[1]), float(value[2]), float(value[3])))
    return tuple(boxes)


def _read_results(db: Database, study_id: int, data_dir: Path) -> _StudyResults:
    """The study UID, the model of the newest result, each instance's result by that model, and the failures."""
    with db.session() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise LookupError(f"no study with id {study_id}")
        out = _StudyResults(study.study_instance_uid, calling_aet=study.calling_aet)
        rows = session.execute(
            select(Instance, InstanceResult)
            .join(InstanceResult, InstanceResult.instance_id == Instance.id)
            .where(Instance.study_id == study_id)
            .order_by(InstanceResult.created_at.desc(), InstanceResult.id.desc())
        ).all()
        if not rows:
            return out
        newest = rows[0][1]
        model_key = (newest.model_name, newest.model_version)
        chosen: dict[int, tuple[Instance, InstanceResult]] = {}
        for instance, result in rows:
            if (result.model_name, result.model_version) == model_key and instance.id not in chosen:
                chosen[instance.id] = (instance, result)
        ordered = sorted(chosen.values(), key=lambda pair: (pair[0].instance_number or 0, pair[0].id))
        threshold = next((r.threshold for _, r in ordered if r.threshold is not None), 0.5)
        model = ModelInfo(name=model_key[0], version=model_key[1], threshold=float(threshold))
        out.model = model
        out.newest = max(_aware(r.created_at) for _, r in ordered)
        for instance, result in ordered:
            if not result.ok or result.probability is None:
                out.failed.append(
                    FailedImage(instance.sop_instance_uid, result.error or "not analysed", instance.instance_number)
                )
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
                boxes=_boxes(result),
            )
            source_path = str(resolve_stored(data_dir, instance.file_path))
            heat_path = str(resolve_stored(data_dir, result.heatmap_path)) if result.heatmap_path else None
            out.analysed.append(_Analysed(source_path, finding, heat_path, instance.instance_number))
        return out


def _prior_sr(session: Session, study_uid: str, row: ResultRevision | None) -> PriorObject | None:
    """The SR of revision ``row``, where one was recorded."""
    if row is None:
        return None
    uid = content_uid(row.digest, KIND_SR)
    if session.scalar(select(OutputObject.id).where(OutputObject.sop_instance_uid == uid)) is None:
        return None
    return PriorObject(SR_SOP_CLASS, uid, content_series_uid(row.digest, KIND_SR), study_uid)


def _revision(db: Database, study_id: int, study_uid: str, content: str, newest: datetime | None) -> Revision:
    """The revision that ``content`` is: the newest one if its content is the same, else the next."""
    with db.session() as session:
        rows = list(
            session.scalars(
                select(ResultRevision)
                .where(ResultRevision.study_id == study_id)
                .order_by(ResultRevision.number.desc())
                .limit(2)
            )
        )
        latest = rows[0] if rows else None
        if latest is not None and latest.content_digest == content:
            before = rows[1] if len(rows) > 1 else None
            return Revision(
                latest.number,
                latest.digest,
                _aware(latest.content_at),
                predecessor=_prior_sr(session, study_uid, before),
                replaces=latest.replaces,
            )
        moment = (newest or utcnow()).astimezone(UTC).replace(microsecond=0)
        if latest is not None:
            # Content time rises with every revision, so viewers sort the newest last.
            moment = max(moment, _aware(latest.content_at).astimezone(UTC) + timedelta(seconds=1))
        replaces = latest.digest if latest is not None else None
        return Revision(
            latest.number + 1 if latest is not None else 1,
            revision_digest(content, replaces),
            moment,
            predecessor=_prior_sr(session, study_uid, latest),
            replaces=replaces,
        )


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
        return cls(kind, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), str(dataset.SeriesInstanceUID), path)

    def reference(self, study_uid: str) -> PriorObject:
        """This object as a Hierarchical SOP Instance Reference needs it."""
        return PriorObject(self.sop_class_uid, self.sop_instance_uid, self.series_instance_uid, study_uid)


@dataclass(frozen=True)
class Publication:
    """What one publication built: the objects written and the revision they are (``None`` when nothing)."""

    objects: list[Written]
    revision: Revision | None = None
    content_digest: str | None = None

    def __bool__(self) -> bool:
        return bool(self.objects)


def record_outputs(
    session: Session,
    study_id: int,
    written: list[Written] | Publication,
    data_dir: Path,
) -> list[OutputObject]:
    """Upsert the ``OutputObject`` rows of ``written`` in the caller's transaction; returns the rows.

    Given a :class:`Publication` of a new revision, the revision is recorded
    and the study's other output rows (earlier revisions) are marked
    superseded. Paths are stored relative to ``data_dir`` so that nodes
    sharing the data folder may mount it in different places.
    """
    publication = written if isinstance(written, Publication) else Publication(list(written))
    now = utcnow()
    rows: list[OutputObject] = []
    for item in publication.objects:
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
    revision = publication.revision
    if revision is not None and publication.content_digest is not None and publication.objects:
        known = session.scalar(
            select(ResultRevision).where(ResultRevision.study_id == study_id, ResultRevision.number == revision.number)
        )
        if known is None:
            session.add(
                ResultRevision(
                    study_id=study_id,
                    number=revision.number,
                    content_digest=publication.content_digest,
                    digest=revision.digest,
                    replaces=revision.replaces,
                    content_at=revision.content_datetime,
                )
            )
            current = {item.sop_instance_uid for item in publication.objects}
            for output in session.scalars(
                select(OutputObject).where(OutputObject.study_id == study_id, OutputObject.superseded.is_(False))
            ):
                if output.sop_instance_uid not in current and output.kind in _REVISED_KINDS:
                    output.superseded = True
    session.flush()
    return rows


_REVISED_KINDS = (KIND_SR, KIND_CAPTURE, KIND_GSPS, KIND_SUMMARY, KIND_RESULT)
"""The kinds a newer revision replaces."""


def _display(source: Dataset) -> npt.NDArray[np.float32] | None:
    try:
        return decode(source).pixels
    except Exception:  # a thumbnail is not worth failing the summary for
        return None


def publish_study(db: Database, study_id: int, settings: Settings) -> Publication:
    """Build and write the result objects of study ``study_id``; returns what was written.

    The caller (the publish stage) records them with :func:`record_outputs`
    and queues their deliveries in the transaction that completes its job.

    Uses each instance's newest result by the model of the study's newest
    result; failed analyses (``ok`` false) are listed in the summary as not
    analysed. An image whose annotated capture or presentation state cannot
    be built is logged and skipped; the SR is still produced. Returns an
    empty publication when there is nothing to report.
    """
    report = settings.report
    results = _read_results(db, study_id, settings.storage.data_dir)
    study_uid, model, analysed = results.study_uid, results.model, results.analysed
    if model is None or not analysed:
        LOGGER.info("study %s: no successful analysis, nothing to publish", study_uid)
        return Publication([])
    if not is_valid_uid(study_uid):
        raise ValueError(f"study {study_id}: Study Instance UID {study_uid!r} is not valid")
    content = content_digest(study_uid, model, [a.finding for a in analysed], results.failed, report)
    revision = _revision(db, study_id, study_uid, content, results.newest)
    data_dir = settings.storage.data_dir
    written: list[Written] = []
    fsync = settings.storage.fsync

    def keep(kind: str, dataset: Dataset) -> Written:
        path = output_path(data_dir, study_uid, str(dataset.SOPInstanceUID))
        write_dataset(dataset, path, fsync=fsync)
        item = Written.of(kind, dataset, path)
        written.append(item)
        return item

    headers: list[Dataset] = []
    findings: list[FindingInput] = []
    summary_images: list[SummaryImage] = []
    states: dict[str, PriorObject] = {}
    for item in analysed:
        sop = item.finding.sop_instance_uid
        try:
            source = make_conformant(pydicom.dcmread(item.file_path), study_uid)
        except Exception as exc:  # a vanished or damaged source drops that image only
            LOGGER.warning("study %s: source %s unreadable (%s)", study_uid, sop, exc)
            continue
        headers.append(source)
        findings.append(item.finding)
        heatmap = _load_heatmap(item.heatmap_path, sop)
        finding = replace(item.finding, heatmap=heatmap) if heatmap is not None else item.finding
        if report.annotated_image and (finding.fracture or report.annotate_negatives):
            try:
                keep(KIND_CAPTURE, build_capture(source, finding, model, report, revision=revision))
            except Exception as exc:  # one bad image must not stop the study's report
                LOGGER.warning("study %s: no annotated image for %s (%s: %s)", study_uid, sop, type(exc).__name__, exc)
        if report.presentation_state:
            try:
                state = keep(KIND_GSPS, build_gsps(source, finding, model, report, revision=revision))
                states[sop] = state.reference(study_uid)
            except Exception as exc:
                LOGGER.warning(
                    "study %s: no presentation state for %s (%s: %s)", study_uid, sop, type(exc).__name__, exc
                )
        if report.study_summary:
            summary_images.append(SummaryImage(item.finding, _display(source), item.instance_number))

    if report.study_summary and summary_images:
        try:
            keep(KIND_SUMMARY, build_summary(headers, summary_images, results.failed, model, report, revision=revision))
        except Exception as exc:
            LOGGER.warning("study %s: no study summary (%s: %s)", study_uid, type(exc).__name__, exc)

    if report.structured_report and findings:
        companions = [w.reference(study_uid) for w in written]
        sr = build_sr(
            headers,
            findings,
            model,
            report,
            revision=revision,
            failed=results.failed,
            presentation_states=states,
            companions=companions,
        )
        sr_written: Written | None = keep(KIND_SR, sr)
    else:
        sr_written = None

    if findings:
        document = _result_document(headers, findings, results, model, revision, sr_written)
        uid = revision.sop_instance_uid(KIND_RESULT)
        path = output_path(data_dir, study_uid, uid).with_suffix(".json")
        write_document(document.to_json(), path, fsync=fsync)
        written.append(Written(KIND_RESULT, "", uid, revision.series_instance_uid(KIND_RESULT), path))

    LOGGER.info(
        "study %s: built %d result object(s) by %s, revision %d",
        study_uid,
        len(written),
        model.label,
        revision.number,
    )
    return Publication(written, revision, content)
