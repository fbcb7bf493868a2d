"""``/metrics``: the service in Prometheus text format (exposition format 0.0.4).

Two sources:

- counted in this process since it started: instances received and refused
  (by source and by PS3.4 B.2.3 status) through the one ingest path, and the
  analysis latency histogram, fed at each scrape from the results written
  since the previous scrape (whichever node analysed them);
- read from the database at scrape time, as gauges, so that they are right
  for the whole installation: studies by state, studies analysed, positive
  studies and images, queue depth and oldest due job per kind, deliveries
  sent and failed, and the health of every role of this node.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_bridge.health import Health
from pacs_bridge.pipeline.actions import queue_stats
from pacs_bridge.store.db import Database
from pacs_bridge.store.models import InstanceResult, Job, JobKind, JobState, Study, StudyState

__all__ = ["CONTENT_TYPE", "ServiceMetrics"]

LOGGER = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_STATUS_NAMES = {
    0xA700: "out_of_resources",
    0xA900: "sop_class_mismatch",
    0xC210: "cannot_understand",
    0xC000: "cannot_understand",
}
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _count(session: Session, query: Any) -> float:
    return float(session.scalar(query) or 0)


class _DatabaseCollector(Collector):
    """Gauges computed from the database and this node's health at scrape time."""

    def __init__(self, db: Database, health: Health, model: Callable[[], tuple[str, str] | None]) -> None:
        self.db = db
        self.health = health
        self.model = model

    def collect(self) -> Iterable[Metric]:
        studies = GaugeMetricFamily("pacs_bridge_studies", "Studies in the index, by pipeline state.", labels=["state"])
        analysed = GaugeMetricFamily("pacs_bridge_studies_analysed", "Studies analysed at least once.")
        positive_studies = GaugeMetricFamily(
            "pacs_bridge_positive_studies", "Studies whose latest analysis found a fracture."
        )
        positive_images = GaugeMetricFamily(
            "pacs_bridge_positive_images", "Image results (all model versions) at or above the threshold."
        )
        depth = GaugeMetricFamily(
            "pacs_bridge_queue_jobs", "Jobs in the queue, by kind and state.", labels=["kind", "state"]
        )
        oldest = GaugeMetricFamily(
            "pacs_bridge_queue_oldest_pending_seconds", "Age of the oldest due pending job, by kind.", labels=["kind"]
        )
        deliveries = GaugeMetricFamily(
            "pacs_bridge_deliveries", "Deliveries of result objects, by state.", labels=["state"]
        )
        failed = GaugeMetricFamily(
            "pacs_bridge_deliveries_failed",
            "Deliveries that failed for good (dead letters), by destination.",
            labels=["destination"],
        )
        with self.db.sessions() as session:
            counts = {
                StudyState(state).value: int(count)
                for state, count in session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
            }
            for study_state in StudyState:
                studies.add_metric([study_state.value], float(counts.get(study_state.value, 0)))
            analysed.add_metric([], _count(session, select(func.count()).where(Study.analysed_at.is_not(None))))
            positive_studies.add_metric([], _count(session, select(func.count()).where(Study.fracture.is_(True))))
            positive_images.add_metric(
                [], _count(session, select(func.count()).where(InstanceResult.fracture.is_(True)))
            )
            for kind, stats in queue_stats(session).items():
                for state in ("pending", "running", "dead"):
                    depth.add_metric([kind, state], float(stats[state]))
                oldest.add_metric([kind], float(stats["oldest_pending_seconds"]))
            by_state = {
                JobState(job_state).value: int(count)
                for job_state, count in session.execute(
                    select(Job.state, func.count()).where(Job.kind == JobKind.DELIVER).group_by(Job.state)
                ).all()
            }
            for job_state in JobState:
                deliveries.add_metric([job_state.value], float(by_state.get(job_state.value, 0)))
            for destination, count in session.execute(
                select(Job.destination, func.count())
                .where(Job.kind == JobKind.DELIVER, Job.state == JobState.DEAD)
                .group_by(Job.destination)
            ):
                failed.add_metric([destination or ""], float(count))
        yield from (studies, analysed, positive_studies, positive_images, depth, oldest, deliveries, failed)

        report = self.health.report()
        up = GaugeMetricFamily("pacs_bridge_healthy", "1 if every role of this node is alive and making progress.")
        up.add_metric([], 1.0 if report.ok else 0.0)
        roles = GaugeMetricFamily(
            "pacs_bridge_role_healthy", "1 if the role is alive and making progress.", labels=["role"]
        )
        for role, status in report.roles.items():
            roles.add_metric([role], 1.0 if status["healthy"] else 0.0)
        yield up
        yield roles
        model = self.model()
        info = GaugeMetricFamily(
            "pacs_bridge_model_info", "The model this node analyses with.", labels=["name", "version"]
        )
        if model is not None:
            info.add_metric(list(model), 1.0)
        yield info


class ServiceMetrics:
    """The registry behind ``/metrics`` for one web server."""

    def __init__(self, db: Database, health: Health, model: Callable[[], tuple[str, str] | None]) -> None:
        self.db = db
        self.registry = CollectorRegistry()
        self.received = Counter(
            "pacs_bridge_instances_received",
            "Instances stored (new or duplicate) by this process, by source (dicom, folder, dicomweb, web).",
            ["source"],
            registry=self.registry,
        )
        self.refused = Counter(
            "pacs_bridge_instances_refused",
            "Instances refused by this process, by source and reason (PS3.4 B.2.3 status).",
            ["source", "reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pacs_bridge_analysis_seconds",
            "Analysis time per image (decode, preprocess, inference, postprocess), from results written "
            "since this process started.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_DatabaseCollector(db, health, model))
        self._last_result_id: int | None = None
        self._lock = threading.Lock()

    def observe_ingest(self, ingestor: Any) -> None:
        """Count every outcome of ``ingestor.ingest`` (C-STORE, folder, STOW-RS, upload) from now on."""
        original = ingestor.ingest
        if getattr(original, "_pacs_bridge_counted", False):
            return

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            source = str(kwargs.get("source", "unknown"))
            outcome = original(*args, **kwargs)
            if outcome.ok:
                self.received.labels(source).inc()
            else:
                reason = _STATUS_NAMES.get(int(outcome.status), f"0x{int(outcome.status):04X}")
                self.refused.labels(source, reason).inc()
            return outcome

        counted._pacs_bridge_counted = True  # type: ignore[attr-defined]
        ingestor.ingest = counted

    def _feed_latency(self) -> None:
        """Add the results written since the last scrape to the latency histogram."""
        with self._lock, self.db.sessions() as session:
            if self._last_result_id is None:
                # Start from now: results older than this process are not its to count.
                self._last_result_id = int(session.scalar(select(func.max(InstanceResult.id))) or 0)
                return
            rows = session.execute(
                select(InstanceResult.id, InstanceResult.timings)
                .where(InstanceResult.id > self._last_result_id)
                .order_by(InstanceResult.id)
                .limit(100_000)
            ).all()
            for result_id, timings in rows:
                self._last_result_id = result_id
                if isinstance(timings, dict) and timings:
                    total_ms = sum(float(v) for v in timings.values() if isinstance(v, int | float))
                    self.latency.observe(total_ms / 1000.0)

    def start(self) -> None:
        """Note where the latency histogram starts (results written before are not counted)."""
        self._feed_latency()

    def render(self) -> bytes:
        """The text exposition of every metric now."""
        try:
            self._feed_latency()
        except Exception as exc:  # a scrape must still answer when the database hiccups
            LOGGER.warning("metrics: cannot read new analysis results: %s", exc)
        return bytes(generate_latest(self.registry))
