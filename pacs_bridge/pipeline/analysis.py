"""The analyse stage: run the model on a settled study's images and record the findings.

The stage claims several analyse jobs at once (one per study) and runs their
images through the ONNX Runtime session in shared batches, so one-image
studies keep the session busy. Per instance it records an ``InstanceResult``
(or the reason it could not be analysed); per study the highest probability
and the number of positive instances. Instances already analysed by the
current model version are not analysed again, so a late instance costs one
image, not the whole study. The findings, the study's state and the publish
job are committed in the transaction that completes the analyse job: a crash
at any point either loses nothing or repeats the analysis, never the
hand-over.

A failure of the decoder or the runtime on one image (native-extension
panics included) fails that image only, with its reason; a batch that fails
as a whole is retried image by image so that the bad image is found.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_bridge.config import Settings
from pacs_bridge.errors import PermanentError
from pacs_bridge.pipeline.queue import ClaimedJob, RetryPolicy, enqueue
from pacs_bridge.pipeline.runner import describe, fatal, record_failure, run_job
from pacs_bridge.store.db import Database
from pacs_bridge.store.layout import relative_to_data, resolve_stored
from pacs_bridge.store.models import (
    Instance,
    InstanceResult,
    InstanceState,
    JobKind,
    Series,
    Study,
    StudyState,
    utcnow,
)
from pacs_bridge.store.spool import valid_uid

__all__ = ["AnalyseStage", "ImageFailure"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFailure:
    """An image that could not be analysed, and why."""

    path: Path
    reason: str


@dataclass
class _Plan:
    """One claimed study: what to analyse and what to skip."""

    job: ClaimedJob
    study_id: int
    study_uid: str
    model_name: str
    model_version: str
    todo: list[tuple[int, str, Path]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class AnalyseStage:
    """Analyses studies with one loaded model (see :mod:`pacs_bridge.pipeline.runner`)."""

    role = "analyse"
    kinds: tuple[JobKind, ...] = (JobKind.ANALYSE,)

    def __init__(self, settings: Settings, db: Database, analyser: Any) -> None:
        self.settings = settings
        self.db = db
        self.analyser = analyser
        self.batch = max(1, int(getattr(analyser, "batch_size", 1)))
        self.publish = settings.report.structured_report or settings.report.annotated_image

    def policy(self, kind: JobKind) -> RetryPolicy:
        """Analysis retries: [analysis] retry_seconds doubling, at most [analysis] max_attempts."""
        return RetryPolicy(
            initial=self.settings.analysis.retry_seconds,
            maximum=max(self.settings.analysis.retry_seconds, 3600.0),
            max_attempts=self.settings.analysis.max_attempts,
        )

    def on_dead(self, job: ClaimedJob, error: BaseException) -> None:
        """The study is failed with the reason."""
        mark_study_failed(self.db, job.study_id, f"analysis failed: {describe(error)}")

    # -- the work -----------------------------------------------------------------------------------

    def run(self, jobs: list[ClaimedJob]) -> int:
        """Analyse the claimed studies' pending images in shared batches; record each study."""
        plans: list[_Plan] = []
        for job in jobs:
            try:
                plans.append(self._plan(job))
            except BaseException as exc:
                if fatal(exc):
                    raise
                record_failure(self.db, self, job, exc)
        paths = [path for plan in plans for _, _, path in plan.todo]
        findings = self._analyse(paths)
        done = 0
        offset = 0
        for plan in plans:
            chunk = findings[offset : offset + len(plan.todo)]
            offset += len(plan.todo)
            if run_job(self.db, self, plan.job, lambda session, p=plan, c=chunk: self._record(session, p, c)):  # type: ignore[misc]
                done += 1
                self._log(plan, chunk)
        return done

    def _analyse(self, paths: list[Path]) -> list[Any]:
        """Findings for ``paths`` in order; an image that breaks the batch is analysed alone."""
        if not paths:
            return []
        try:
            return list(self.analyser.analyse_paths(paths))
        except BaseException as exc:
            if fatal(exc):
                raise
            if len(paths) == 1:
                return [ImageFailure(paths[0], f"analysis failed: {describe(exc)}")]
            LOGGER.warning("a batch of %d images failed (%s); analysing them one by one", len(paths), describe(exc))
        results: list[Any] = []
        for path in paths:
            results.extend(self._analyse([path]))
        return results

    def _plan(self, job: ClaimedJob) -> _Plan:
        """What to analyse in a study: routed instances without a result from the current model."""
        model = self.analyser.model
        model_name, model_version = model.manifest.name, model.manifest.version
        wanted = {m.upper() for m in self.settings.study.modalities}
        data_dir = self.settings.storage.data_dir
        with self.db.session() as session:
            study = session.get(Study, job.study_id) if job.study_id is not None else None
            if study is None:
                raise PermanentError(f"study id {job.study_id} does not exist")
            session.execute(
                update(Study)
                .where(Study.id == study.id, Study.state == StudyState.QUEUED)
                .values(state=StudyState.ANALYSING, state_reason=None)
                .execution_options(synchronize_session=False)
            )
            rows = session.execute(
                select(Instance, Series.modality)
                .join(Series, Instance.series_id == Series.id)
                .where(Instance.study_id == study.id)
            ).all()
            done_ids = set(
                session.scalars(
                    select(InstanceResult.instance_id).where(
                        InstanceResult.instance_id.in_([r[0].id for r in rows]),
                        InstanceResult.model_name == model_name,
                        InstanceResult.model_version == model_version,
                    )
                )
            )
            plan = _Plan(job, study.id, study.study_instance_uid, model_name, model_version)
            for instance, modality in rows:
                if instance.id in done_ids:
                    continue
                if (modality or "").upper() in wanted and instance.sop_class_uid in self.settings.study.sop_classes:
                    plan.todo.append(
                        (instance.id, instance.sop_instance_uid, resolve_stored(data_dir, instance.file_path))
                    )
                else:
                    plan.skipped.append(instance.id)
        return plan

    def _heatmap_path(self, study_uid: str, sop_uid: str) -> Path | None:
        if not (valid_uid(study_uid) and valid_uid(sop_uid)):
            return None
        return self.settings.storage.data_dir / "heatmaps" / study_uid / f"{sop_uid}.npy"

    def _record(self, session: Session, plan: _Plan, findings: list[Any]) -> None:
        """Store one study's findings and state, and queue its publication (caller's transaction)."""
        for instance_id in plan.skipped:
            session.execute(update(Instance).where(Instance.id == instance_id).values(state=InstanceState.SKIPPED))
        for (instance_id, sop_uid, _), finding in zip(plan.todo, findings, strict=True):
            row = self._result_row(instance_id, plan.study_uid, sop_uid, finding, plan.model_name, plan.model_version)
            existing = session.scalar(
                select(InstanceResult).where(
                    InstanceResult.instance_id == instance_id,
                    InstanceResult.model_name == plan.model_name,
                    InstanceResult.model_version == plan.model_version,
                )
            )
            if existing is not None:  # a re-run after a lost lease: the newer finding wins
                session.delete(existing)
                session.flush()
            session.add(row)
            session.execute(
                update(Instance)
                .where(Instance.id == instance_id)
                .values(state=InstanceState.ANALYSED if row.ok else InstanceState.FAILED)
            )
        session.flush()
        summary = summarise(session, plan.study_id, plan.model_name, plan.model_version)
        values: dict[str, Any] = {
            "analysed_at": utcnow(),
            "model_name": plan.model_name,
            "model_version": plan.model_version,
            "attempts": Study.attempts + 1,
            **summary,
        }
        publish = False
        if summary["max_probability"] is None:
            values.update(state=StudyState.FAILED, state_reason=failure_reason(session, plan.study_id))
        elif self.publish:
            values.update(state=StudyState.ANALYSING, state_reason="results being built")
            publish = True
        else:
            values.update(state=StudyState.DONE, state_reason=None)
        # A late instance meanwhile set the study back to receiving: leave it so; the
        # analysis that follows its settling publishes the whole study.
        result = session.execute(
            update(Study)
            .where(Study.id == plan.study_id, Study.state.in_([StudyState.QUEUED, StudyState.ANALYSING]))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if publish and result.rowcount == 1:  # type: ignore[attr-defined]
            enqueue(session, JobKind.PUBLISH, study_id=plan.study_id)

    def _log(self, plan: _Plan, findings: list[Any]) -> None:
        failures = sum(1 for f in findings if _reason(f) is not None)
        LOGGER.info(
            "study %s analysed by %s %s: %d images, %d failed, %d skipped, %.2f s",
            plan.study_uid,
            plan.model_name,
            plan.model_version,
            len(findings),
            failures,
            len(plan.skipped),
            time.perf_counter() - plan.started,
        )

    def _result_row(
        self, instance_id: int, study_uid: str, sop_uid: str, finding: Any, model_name: str, model_version: str
    ) -> InstanceResult:
        reason = _reason(finding)
        if reason is not None:
            LOGGER.warning("instance %s of study %s not analysed: %s", sop_uid, study_uid, reason)
            return InstanceResult(
                instance_id=instance_id, model_name=model_name, model_version=model_version, ok=False, error=reason
            )
        heatmap_path = None
        if getattr(finding, "heatmap", None) is not None:
            target = self._heatmap_path(study_uid, sop_uid)
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, np.asarray(finding.heatmap, dtype=np.float16))
                heatmap_path = relative_to_data(target, self.settings.storage.data_dir)
        boxes = getattr(finding, "boxes", None)
        return InstanceResult(
            instance_id=instance_id,
            model_name=model_name,
            model_version=model_version,
            ok=True,
            probability=float(finding.probability),
            fracture=bool(finding.fracture),
            threshold=float(finding.threshold),
            body_part=finding.body_part,
            box=[int(v) for v in finding.box] if finding.box is not None else None,
            boxes=[{"box": [int(v) for v in box], "score": float(score)} for box, score in boxes] if boxes else None,
            peak=[int(v) for v in finding.peak] if getattr(finding, "peak", None) is not None else None,
            heatmap_path=heatmap_path,
            provider=getattr(finding, "provider", None),
            timings=dict(getattr(finding, "timings", {}) or {}),
        )


def _reason(finding: Any) -> str | None:
    if isinstance(finding, ImageFailure):
        return finding.reason
    reason = getattr(finding, "reason", None)
    return None if reason is None else str(reason)


def summarise(session: Session, study_id: int, model_name: str, model_version: str) -> dict[str, Any]:
    """The study's highest probability and positives among its successful results by this model."""
    results = session.scalars(
        select(InstanceResult)
        .join(Instance, Instance.id == InstanceResult.instance_id)
        .where(
            Instance.study_id == study_id,
            InstanceResult.model_name == model_name,
            InstanceResult.model_version == model_version,
            InstanceResult.ok.is_(True),
        )
    ).all()
    if not results:
        return {"max_probability": None, "positive_instances": 0, "fracture": None}
    positives = sum(1 for r in results if r.fracture)
    return {
        "max_probability": max(float(r.probability or 0.0) for r in results),
        "positive_instances": positives,
        "fracture": positives > 0,
    }


def failure_reason(session: Session, study_id: int) -> str:
    """Why no instance of a study could be analysed (the first reasons, for the administrator)."""
    errors = session.scalars(
        select(InstanceResult.error)
        .join(Instance, Instance.id == InstanceResult.instance_id)
        .where(Instance.study_id == study_id, InstanceResult.ok.is_(False))
        .limit(3)
    ).all()
    detail = "; ".join(e for e in errors if e)
    return f"no instance could be analysed: {detail}" if detail else "no instance could be analysed"


def mark_study_failed(db: Database, study_id: int | None, reason: str) -> None:
    """Set a study ``failed`` with ``reason`` (a dead job made it impossible to finish)."""
    if study_id is None:
        return
    with db.session() as session:
        session.execute(
            update(Study)
            .where(Study.id == study_id, Study.state != StudyState.RECEIVING)
            .values(state=StudyState.FAILED, state_reason=reason[:2000])
            .execution_options(synchronize_session=False)
        )
