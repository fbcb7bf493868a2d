"""Retention: ``pacs-bridge purge --older-than DAYS``.

A study is removed once it is final (done, failed or skipped), received
longer ago than the retention period, and has no job pending or running:
its spool files, result objects, heatmaps and rows. Finished jobs (done)
older than the period are removed too; dead letters are kept until their
study goes, so that an administrator sees them. Nothing a running stage
still needs is touched.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, select

from pacs_bridge.config import Settings
from pacs_bridge.store.db import Database
from pacs_bridge.store.layout import resolve_stored
from pacs_bridge.store.models import Instance, Job, JobState, OutputObject, Study, StudyState, utcnow
from pacs_bridge.store.spool import valid_uid

__all__ = ["purge"]

LOGGER = logging.getLogger(__name__)

_FINAL = (StudyState.DONE, StudyState.FAILED, StudyState.SKIPPED)


def _remove(path: Path, dry_run: bool) -> int:
    try:
        size = path.stat().st_size
    except OSError:
        return -1
    if not dry_run:
        path.unlink(missing_ok=True)
    return size


def purge(db: Database, settings: Settings, *, older_than_days: float, dry_run: bool = False) -> dict[str, Any]:
    """Remove what is older than the retention period; returns counts of studies, files, bytes and jobs."""
    if older_than_days < 0:
        raise ValueError("the retention period cannot be negative")
    cutoff = utcnow() - timedelta(days=older_than_days)
    data_dir = settings.storage.data_dir
    counts = {"studies": 0, "files": 0, "bytes": 0, "jobs": 0}
    with db.session() as session:
        active = exists().where(Job.study_id == Study.id, Job.state.in_([JobState.PENDING, JobState.RUNNING]))
        studies = session.scalars(
            select(Study).where(Study.state.in_(_FINAL), Study.last_received_at < cutoff, ~active)
        ).all()
        for study in studies:
            paths = [
                resolve_stored(data_dir, p)
                for p in session.scalars(select(Instance.file_path).where(Instance.study_id == study.id))
            ]
            paths += [
                resolve_stored(data_dir, p)
                for p in session.scalars(select(OutputObject.file_path).where(OutputObject.study_id == study.id))
            ]
            for path in paths:
                size = _remove(path, dry_run)
                if size >= 0:
                    counts["files"] += 1
                    counts["bytes"] += size
            uid = study.study_instance_uid
            if valid_uid(uid) and not dry_run:
                for folder in ("spool", "outputs", "heatmaps"):
                    target = data_dir / folder / uid
                    if target.is_dir():
                        shutil.rmtree(target, ignore_errors=True)
            counts["studies"] += 1
            if not dry_run:
                session.delete(study)
        finished = select(Job.id).where(Job.state == JobState.DONE, Job.finished_at < cutoff)
        counts["jobs"] = len(session.scalars(finished).all())
        if dry_run:
            session.rollback()
        else:
            session.execute(delete(Job).where(Job.id.in_(finished)))
    LOGGER.info(
        "purge older than %.1f days%s: %d studies, %d files, %d bytes, %d jobs",
        older_than_days,
        " (dry run)" if dry_run else "",
        counts["studies"],
        counts["files"],
        counts["bytes"],
        counts["jobs"],
    )
    return counts
