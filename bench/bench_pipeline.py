"""End-to-end pipeline throughput and latency, one site per configuration, in one run.

Configurations (same studies, same tiny test model so that the queue, not the
model, is measured; Orthanc as the destination):

- SQLite, one process (``serve`` with every role);
- PostgreSQL, one receiving process and 1, 2 and 3 worker processes.

Figures:

- studies per minute: from the first C-STORE of 200 one-image studies until
  every study is ``done`` and every result object acknowledged by Orthanc;
- latency: for 50 one-image studies sent one at a time, the time from the
  last C-STORE's acknowledgement to Orthanc's acknowledgement of the study's
  SR (the deliver job's finish), minus ``settle_seconds``; median and 95th
  percentile.

Run: ``python bench/bench_pipeline.py [--studies 200] [--latency 50]``; prints
a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from pacs_bridge.store.models import Job, JobKind, JobState, OutputObject, Study  # noqa: E402
from tests.support.cluster import Site, make_studies, site, store_all  # noqa: E402
from tests.support.postgres import PostgresServer, postgres_available  # noqa: E402
from tests.support.tiny_model import build_tiny_model  # noqa: E402

SETTLE = 0.5


def _sr_finished(running: Site, study_uid: str) -> datetime | None:
    with running.db.sessions() as session:
        value = session.scalar(
            select(Job.finished_at)
            .join(OutputObject, Job.output_id == OutputObject.id)
            .join(Study, OutputObject.study_id == Study.id)
            .where(
                Study.study_instance_uid == study_uid,
                OutputObject.kind == "sr",
                Job.kind == JobKind.DELIVER,
                Job.state == JobState.DONE,
            )
        )
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _stage_finishes(running: Site, study_uid: str) -> dict[str, datetime]:
    """When the study's last settle, analyse and publish jobs finished."""
    with running.db.sessions() as session:
        rows = session.execute(
            select(Job.kind, Job.finished_at)
            .join(Study, Job.study_id == Study.id)
            .where(Study.study_instance_uid == study_uid, Job.state == JobState.DONE)
        ).all()
    out: dict[str, datetime] = {}
    for kind, finished in rows:
        if finished is not None:
            value = finished if finished.tzinfo else finished.replace(tzinfo=UTC)
            out[JobKind(kind).value] = max(value, out.get(JobKind(kind).value, value))
    return out


def measure(running: Site, studies: int, latency_studies: int) -> dict[str, float]:
    """Throughput over ``studies``, then latency over ``latency_studies``."""
    batch = make_studies(studies, seed=3)
    started = time.monotonic()
    assert store_all(running.receiver.port, batch) == [0] * studies
    running.wait_all_done(studies, timeout=3600)
    per_minute = studies / ((time.monotonic() - started) / 60)
    latencies = []
    stages: dict[str, list[float]] = {"settle": [], "analyse": [], "publish": [], "deliver": []}
    for ds in make_studies(latency_studies, seed=5):
        assert store_all(running.receiver.port, [ds]) == [0]
        acked = datetime.now(UTC)
        deadline = time.monotonic() + 120
        while (finished := _sr_finished(running, str(ds.StudyInstanceUID))) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SR delivered for {ds.StudyInstanceUID}")
            time.sleep(0.02)
        latencies.append((finished - acked).total_seconds() - SETTLE)
        marks = _stage_finishes(running, str(ds.StudyInstanceUID))
        previous = acked + timedelta(seconds=SETTLE)
        for kind in ("settle", "analyse", "publish"):
            stages[kind].append((marks[kind] - previous).total_seconds())
            previous = marks[kind]
        stages["deliver"].append((finished - previous).total_seconds())
    latencies.sort()
    figures = {
        "per_minute": per_minute,
        "median": statistics.median(latencies),
        "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)],
    }
    # Where the median latency goes: each stage's share, from the previous stage's finish to its own.
    figures.update({f"{kind}_median": statistics.median(values) for kind, values in stages.items()})
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--latency", type=int, default=50)
    parser.add_argument("--workers", default="1,2,3", help="PostgreSQL worker counts")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        folder = Path(tmp)
        model = build_tiny_model(folder / "model")
        extra = {"study": {"settle_seconds": SETTLE}}
        with site(folder / "sqlite", model, database_url=None, workers=0, extra=extra) as running:
            rows.append(("SQLite, 1 process", measure(running, args.studies, args.latency)))
            print(rows[-1], flush=True)
        if postgres_available():
            for count in (int(n) for n in args.workers.split(",") if n.strip()):
                with PostgresServer(folder / f"pg{count}") as pg:
                    with site(
                        folder / f"pg-site{count}", model, database_url=pg.url, workers=count, extra=extra
                    ) as running:
                        rows.append(
                            (f"PostgreSQL, receiver + {count} worker(s)", measure(running, args.studies, args.latency))
                        )
                        print(rows[-1], flush=True)
        else:
            print("PostgreSQL not available: only SQLite measured", file=sys.stderr)
    print()
    print(f"| site | studies/min ({args.studies} one-image studies) | latency median | latency p95 |")
    print("| --- | --- | --- | --- |")
    for name, figures in rows:
        median, p95 = figures["median"] * 1000, figures["p95"] * 1000
        print(f"| {name} | {figures['per_minute']:.0f} | {median:.0f} ms | {p95:.0f} ms |")
    print()
    print("| site | settle (after quiet period) | analyse | publish | deliver SR |")
    print("| --- | --- | --- | --- | --- |")
    for name, figures in rows:
        shares = " | ".join(
            f"{figures[f'{k}_median'] * 1000:.0f} ms" for k in ("settle", "analyse", "publish", "deliver")
        )
        print(f"| {name} | {shares} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
