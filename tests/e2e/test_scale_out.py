"""Several nodes on one PostgreSQL database and one shared data folder; and the same site on SQLite.

One receiving process and three worker processes (``pacs-bridge worker``,
seeing the data folder under another path) share the queue: 200 studies
pushed over DICOM are each analysed exactly once and each result object is
delivered exactly once to a real Orthanc. One worker is killed with SIGKILL
while it holds an analysis job: another worker finishes that job once the
lease expires.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pacs_bridge.config import DICOM_KINDS
from pacs_bridge.store.models import Instance, InstanceResult, Job, JobKind, JobState, OutputObject
from tests.support.cluster import Site, make_studies, site, store_all
from tests.support.orthanc import orthanc_available
from tests.support.postgres import PostgresServer, postgres_available
from tests.support.tiny_model import build_tiny_model

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc binary not installed"),
]

STUDIES = int(os.environ.get("PACS_BRIDGE_TEST_STUDIES", "200"))
# The queue is under test, not the report: an SR and an annotated image per study are enough
# to check exactly-once delivery, and the presentation state and summary image would double
# the publishing time (bench/bench_pipeline.py measures the full set).
REPORT = {"report": {"presentation_state": False, "study_summary": False}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"))


def _check_exactly_once(running: Site, studies: int) -> None:
    db = running.db
    with db.sessions() as session:
        # One result per instance: each analysed exactly once.
        per_instance = Counter(session.scalars(select(InstanceResult.instance_id)))
        assert len(per_instance) == studies and set(per_instance.values()) == {1}
        assert session.scalar(select(func.count()).select_from(Instance)) == studies
        done_analyses = Counter(
            session.scalars(select(Job.study_id).where(Job.kind == JobKind.ANALYSE, Job.state == JobState.DONE))
        )
        assert len(done_analyses) == studies and set(done_analyses.values()) == {1}
        # Each DICOM result object delivered once to the DICOM destination: one completed deliver job each.
        outputs = set(session.scalars(select(OutputObject.sop_instance_uid).where(OutputObject.kind.in_(DICOM_KINDS))))
        delivered = Counter(
            session.scalars(select(Job.output_id).where(Job.kind == JobKind.DELIVER, Job.state == JobState.DONE))
        )
        assert outputs and len(delivered) == len(outputs) and set(delivered.values()) == {1}
        paths = list(session.scalars(select(OutputObject.file_path)))
        paths += list(session.scalars(select(Instance.file_path)))
        paths += [p for p in session.scalars(select(InstanceResult.heatmap_path)) if p]
    # Instances, heatmaps and result objects are recorded relative to the shared folder: nodes may mount it anywhere.
    assert paths and all(not Path(p).is_absolute() for p in paths)
    stored = running.pacs.rest("GET", "/statistics")["CountInstances"]
    assert stored == len(outputs)


@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL server or psycopg not installed")
def test_three_workers_on_postgresql_and_one_killed(tmp_path: Path, model_dir: Path) -> None:
    with PostgresServer(tmp_path / "pg") as pg:
        stall = {"PACS_BRIDGE_FAILPOINTS": "analyse.before-commit=sleep:600"}
        with site(
            tmp_path / "site", model_dir, database_url=pg.url, workers=3, worker_env=[None, None, stall], extra=REPORT
        ) as s:
            victim = s.workers[2]
            statuses = store_all(s.receiver.port, make_studies(STUDIES))
            assert statuses == [0] * STUDIES
            # The third worker stalls holding an analysis job: kill it there.
            deadline = time.monotonic() + 120
            while "failpoint analyse.before-commit" not in victim.log():
                assert time.monotonic() < deadline, victim.log()[-3000:]
                time.sleep(0.2)
            with s.db.sessions() as session:
                held = list(
                    session.scalars(
                        select(Job.id).where(Job.state == JobState.RUNNING, Job.lease_owner.startswith("worker2:"))
                    )
                )
            assert held
            victim.kill9()
            s.wait_all_done(STUDIES, timeout=600)
            with s.db.sessions() as session:
                for job_id in held:
                    job = session.get(Job, job_id)
                    assert job is not None and job.state == JobState.DONE
            assert "taken over from worker2:" in s.workers[0].log() + s.workers[1].log()
            _check_exactly_once(s, STUDIES)


def test_one_process_on_sqlite(tmp_path: Path, model_dir: Path) -> None:
    with site(tmp_path / "site", model_dir, database_url=None, workers=0, extra=REPORT) as s:
        assert store_all(s.receiver.port, make_studies(STUDIES, seed=11)) == [0] * STUDIES
        s.wait_all_done(STUDIES, timeout=600)
        _check_exactly_once(s, STUDIES)
