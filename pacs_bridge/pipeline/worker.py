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
        """Settle due studies and analyse at most one; True if a study was analysed."""
        with self.db.sessions() as session:
            settle_due(session, self.settings.study)
            session.commit()
        if self.analyser is None or self._stop.is_set():
            return False
        with self.db.sessions() as session:
            study = claim_next(session, self.name)
            if study is None:
                return False
            study_id = study.id
            study_uid = study.study_instance_uid
        try:
            self.analyse_study(study_id)
        except Exception as exc:
            LOGGER.exception("analysis of study %s failed", study_uid)
            with self.db.session() as session:
                retry_later(
                    session,
                    study_id,
                    f"{type(exc).__name__}: {exc}",
                    max_attempts=self.settings.analysis.max_attempts,
                    base_seconds=self.settings.analysis.retry_seconds,
                )
            return True
        self.analysed_studies += 1
        return True

    def _heatmap_path(self, study_uid: str, sop_uid: str) -> Path | None:
        if not (valid_uid(study_uid) and valid_uid(sop_uid)):
            return None
        return self.settings.storage.data_dir / "heatmaps" / study_uid / f"{sop_uid}.npy"

    def analyse_study(self, study_id: int) -> None:
        """Analyse the study's pending instances and record the results."""
        started = time.perf_counter()
        model = self.analyser.model  # type: ignore[union-attr]
        model_name, model_version = model.manifest.name, model.manifest.version
        wanted = {m.upper() for m in self.settings.study.modalities}
        with self.db.sessions() as session:
            study = session.get(Study, study_id)
            assert study is not None
            study_uid = study.study_instance_uid
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
            todo: list[tuple[int, str, Path]] = []
            skipped: list[int] = []
            for instance, modality in rows:
                if instance.id in done_ids:
                    continue
                if (modality or "").upper() in wanted and instance.sop_class_uid in self.settings.study.sop_classes:
                    todo.append((instance.id, instance.sop_instance_uid, Path(instance.file_path)))
                else:
                    skipped.append(instance.id)
        findings = self.analyser.analyse_paths([p for _, _, p in todo]) if todo else []  # type: ignore[union-attr]
        with self.db.session() as session:
            for instance_id in skipped:
                session.execute(
                    update(Instance).where(Instance.id == instance_id).values(state=InstanceState.SKIPPED)
                )
            for (instance_id, sop_uid, _), finding in zip(todo, findings, strict=True):
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
            len(skipped),
            "n/a" if summary["max_probability"] is None else f"{summary['max_probability']:.3f}",
            summary["positive_instances"] or 0,
            time.perf_counter() - started,
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
