"""The analysis worker: settles studies, takes queued ones, analyses, records, publishes.

Runs in its own thread, apart from the receiving threads; the ONNX Runtime
session is created once. Per instance it records an ``InstanceResult`` (or the
reason it could not be analysed); per study the highest probability and the
number of positive instances. Instances already analysed by the current
model version are not analysed again, so a late instance costs one image,
not the whole study.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update

from pacs_bridge.config import Settings
from pacs_bridge.pipeline.jobs import claim_next, recover_interrupted, retry_later
from pacs_bridge.pipeline.settle import settle_due
from pacs_bridge.store.db import Database
from pacs_bridge.store.models import (
    Instance,
    InstanceResult,
    InstanceState,
    Series,
    Study,
    StudyState,
    utcnow,
)
from pacs_bridge.store.spool import valid_uid

__all__ = ["Worker"]

LOGGER = logging.getLogger(__name__)

Publisher = Callable[[Database, int, Settings], Any]


@dataclass
class _Plan:
    """One claimed study: what to analyse and what to skip."""

    study_id: int
    study_uid: str
    model_name: str
    model_version: str
    todo: list[tuple[int, str, Path]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class Worker:
    """Settles, analyses and publishes; ``start()`` runs it in a thread."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        analyser: Any | None,
        publisher: Publisher | None = None,
        on_published: Callable[[], None] | None = None,
        *,
        poll_seconds: float = 0.5,
    ) -> None:
        self.settings = settings
        self.db = db
        self.analyser = analyser
        self.publisher = publisher
        self.on_published = on_published
        self.poll_seconds = poll_seconds
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.analysed_studies = 0

    def wake(self) -> None:
        """Look for work now."""
        self._wake.set()

    def start(self) -> None:
        """Recover interrupted work and start the loop."""
        with self.db.session() as session:
            recover_interrupted(session)
        self._thread = threading.Thread(target=self._run, name="analysis-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the study in hand, take no new one."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        LOGGER.info("analysis worker stopped after %d studies", self.analysed_studies)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:
                LOGGER.exception("worker round failed; continuing")
                busy = False
            if not busy:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def run_once(self) -> bool:
        """Settle due studies, then analyse one batch of queued studies; True if any was analysed."""
        with self.db.sessions() as session:
            settle_due(session, self.settings.study)
            session.commit()
        if self.analyser is None or self._stop.is_set():
            return False
        plans: list[_Plan] = []
        images = 0
        # Small studies (one or two radiographs) share a batch: claim until it is full.
        while images < self.analyser.batch_size and len(plans) < self.analyser.batch_size:
            with self.db.sessions() as session:
                study = claim_next(session, self.name)
                if study is None:
                    break
                study_id = study.id
            try:
                plan = self._plan(study_id)
            except Exception as exc:
                self._retry(study_id, exc)
                continue
            plans.append(plan)
            images += len(plan.todo)
        if not plans:
            return False
        try:
            paths = [path for plan in plans for _, _, path in plan.todo]
            findings = self.analyser.analyse_paths(paths) if paths else []
        except Exception as exc:
            for plan in plans:
                self._retry(plan.study_id, exc)
            return True
        offset = 0
        for plan in plans:
            chunk = findings[offset : offset + len(plan.todo)]
            offset += len(plan.todo)
            try:
                self._record(plan, chunk)
            except Exception as exc:
                self._retry(plan.study_id, exc)
                continue
            self.analysed_studies += 1
        return True

    def _retry(self, study_id: int, exc: Exception) -> None:
        LOGGER.error("analysis of study id %d failed: %s: %s", study_id, type(exc).__name__, exc)
        with self.db.session() as session:
            retry_later(
                session,
                study_id,
                f"{type(exc).__name__}: {exc}",
                max_attempts=self.settings.analysis.max_attempts,
                base_seconds=self.settings.analysis.retry_seconds,
            )

    def _heatmap_path(self, study_uid: str, sop_uid: str) -> Path | None:
        if not (valid_uid(study_uid) and valid_uid(sop_uid)):
            return None
        return self.settings.storage.data_dir / "heatmaps" / study_uid / f"{sop_uid}.npy"

    def analyse_study(self, study_id: int) -> None:
        """Analyse one claimed study's pending instances and record the results."""
        plan = self._plan(study_id)
        paths = [path for _, _, path in plan.todo]
        self._record(plan, self.analyser.analyse_paths(paths) if paths else [])  # type: ignore[union-attr]

    def _plan(self, study_id: int) -> _Plan:
        """What to analyse in a study: routed instances without a result from the current model."""
        model = self.analyser.model  # type: ignore[union-attr]
        model_name, model_version = model.manifest.name, model.manifest.version
        wanted = {m.upper() for m in self.settings.study.modalities}
        with self.db.sessions() as session:
            study = session.get(Study, study_id)
            assert study is not None
            rows = session.execute(
                select(Instance, Series.modality)
                .join(Series, Instance.series_id == Series.id)
                .where(Instance.study_id == study_id)
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
            plan = _Plan(study_id, study.study_instance_uid, model_name, model_version)
            for instance, modality in rows:
                if instance.id in done_ids:
                    continue
                if (modality or "").upper() in wanted and instance.sop_class_uid in self.settings.study.sop_classes:
                    plan.todo.append((instance.id, instance.sop_instance_uid, Path(instance.file_path)))
                else:
                    plan.skipped.append(instance.id)
        return plan

    def _record(self, plan: _Plan, findings: list[Any]) -> None:
        """Store the findings of one study, settle its state, publish its result objects."""
        study_id, study_uid = plan.study_id, plan.study_uid
        model_name, model_version = plan.model_name, plan.model_version
        with self.db.session() as session:
            for instance_id in plan.skipped:
                session.execute(update(Instance).where(Instance.id == instance_id).values(state=InstanceState.SKIPPED))
            for (instance_id, sop_uid, _), finding in zip(plan.todo, findings, strict=True):
                session.add(self._result_row(instance_id, study_uid, sop_uid, finding, model_name, model_version))
                ok = getattr(finding, "reason", None) is None
                session.execute(
                    update(Instance)
                    .where(Instance.id == instance_id)
                    .values(state=InstanceState.ANALYSED if ok else InstanceState.FAILED)
                )
            session.flush()
            summary = self._summarise(session, study_id, model_name, model_version)
            values: dict[str, Any] = {
                "analysed_at": utcnow(),
                "model_name": model_name,
                "model_version": model_version,
                "claimed_by": None,
                **summary,
            }
            if summary["max_probability"] is None:
                values.update(state=StudyState.FAILED, state_reason="no instance could be analysed")
            else:
                values.update(state=StudyState.DONE, state_reason=None)
            # A late instance meanwhile set the study back to receiving: leave it so.
            session.execute(
                update(Study)
                .where(Study.id == study_id, Study.state == StudyState.ANALYSING)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        failures = sum(1 for f in findings if getattr(f, "reason", None) is not None)
        LOGGER.info(
            "study %s analysed by %s %s: %d images, %d failed, %d skipped, max probability %s, %d positive, %.2f s",
            study_uid,
            model_name,
            model_version,
            len(findings),
            failures,
            len(plan.skipped),
            "n/a" if summary["max_probability"] is None else f"{summary['max_probability']:.3f}",
            summary["positive_instances"] or 0,
            time.perf_counter() - plan.started,
        )
        if self.publisher is not None and summary["max_probability"] is not None:
            try:
                self.publisher(self.db, study_id, self.settings)
                if self.on_published is not None:
                    self.on_published()
            except Exception as exc:
                LOGGER.exception("results of study %s could not be built", study_uid)
                with self.db.session() as session:
                    study = session.get(Study, study_id)
                    if study is not None:
                        study.state_reason = f"results not built: {exc}"

    def _result_row(
        self, instance_id: int, study_uid: str, sop_uid: str, finding: Any, model_name: str, model_version: str
    ) -> InstanceResult:
        reason = getattr(finding, "reason", None)
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
                heatmap_path = str(target)
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
            peak=[int(v) for v in finding.peak] if getattr(finding, "peak", None) is not None else None,
            heatmap_path=heatmap_path,
            provider=getattr(finding, "provider", None),
            timings=dict(getattr(finding, "timings", {}) or {}),
        )

    @staticmethod
    def _summarise(session: Any, study_id: int, model_name: str, model_version: str) -> dict[str, Any]:
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
