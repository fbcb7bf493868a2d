"""A site of several pacs-bridge processes sharing one database and one data folder.

One receiving node (``serve --roles receive``, or every role when there are
no workers) and N worker nodes (``pacs-bridge worker``), an Orthanc as the
destination, studies pushed over DICOM. Used by the scale-out test and by
``bench/bench_pipeline.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]
from sqlalchemy import func, select

from pacs_bridge.send.dimse import keep_responses
from pacs_bridge.store.db import Database, open_database
from pacs_bridge.store.models import Job, JobKind, JobState, Study, StudyState
from tests.support.dicom_files import make_radiograph
from tests.support.orthanc import OrthancServer
from tests.support.paths import REPO_ROOT
from tests.support.serve import ServeProcess, free_port, run_cli

__all__ = ["Site", "make_studies", "site", "store_all"]

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "fracatlas"


def make_studies(count: int, *, seed: int = 7) -> list[Dataset]:
    """``count`` one-image DX studies made from the FracAtlas fixture radiographs (each a little different)."""
    rng = np.random.default_rng(seed)
    sources = sorted(FIXTURES.glob("images/*/*.jpg"))
    out = []
    for index in range(count):
        base = make_radiograph(sources[index % len(sources)], generate_uid(), instance_number=1)
        pixels = base.pixel_array.astype(np.int32)
        pixels = np.roll(pixels, int(rng.integers(0, 9)), axis=1)
        base.PixelData = np.clip(pixels, 0, 4095).astype(base.pixel_array.dtype).tobytes()
        out.append(base)
    return out


def store_all(port: int, datasets: Sequence[Dataset], calling: str = "MODALITY") -> list[int]:
    """C-STORE every dataset over one association; the statuses."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE"))
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@dataclass
class Site:
    """The running processes and how to look at them."""

    receiver: ServeProcess
    workers: list[ServeProcess]
    db: Database
    pacs: OrthancServer

    def counts(self) -> dict[str, int]:
        """Studies by state."""
        with self.db.sessions() as session:
            return {
                str(state): int(n)
                for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state))
            }

    def open_deliveries(self) -> int:
        """Deliver jobs not yet done (pending, running or dead)."""
        with self.db.sessions() as session:
            return int(
                session.scalar(select(func.count()).where(Job.kind == JobKind.DELIVER, Job.state != JobState.DONE)) or 0
            )

    def wait_all_done(self, studies: int, timeout: float) -> None:
        """Until every study is done and every delivery sent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.counts()
            if counts.get(StudyState.DONE.value, 0) >= studies and self.open_deliveries() == 0:
                return
            time.sleep(0.5)
        logs = "\n".join(w.log()[-2000:] for w in [self.receiver, *self.workers])
        raise TimeoutError(f"not done after {timeout} s: {self.counts()}, {self.open_deliveries()} open\n{logs}")


@contextmanager
def site(
    folder: Path,
    model_dir: Path,
    *,
    database_url: str | None,
    workers: int,
    worker_env: Sequence[dict[str, str] | None] = (),
    lease_seconds: float = 3.0,
    extra: dict[str, Any] | None = None,
) -> Iterator[Site]:
    """Orthanc, a receiving node and ``workers`` worker nodes; SQLite (one node) when no URL is given."""
    shared = folder / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    # Workers see the shared folder under another path, as another machine's mount would.
    mount = folder / "mount"
    if not mount.exists():
        mount.symlink_to(shared, target_is_directory=True)
    with ExitStack() as stack:
        pacs = OrthancServer(folder / "orthanc", {})
        pacs.start()
        stack.callback(pacs.stop)
        common: dict[str, Any] = {
            "analysis": {"enabled": True, "model_dir": str(model_dir), "intra_op_threads": 1, "batch_size": 8},
            "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
            "send": {"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
            "study": {"settle_seconds": 0.5},
            "queue": {"lease_seconds": lease_seconds, "poll_seconds": 0.2},
            **(extra or {}),
        }
        storage: dict[str, Any] = {"data_dir": str(shared), "min_free_mb": 1}
        if database_url:
            storage["database_url"] = database_url
        receiver_config = {**common, "storage": storage}
        if workers:
            receiver_config["queue"] = {**common["queue"], "roles": ["receive"]}
        receiver = ServeProcess(folder / "receiver", receiver_config, port=free_port())
        receiver.config["storage"] = storage
        if workers:
            receiver.workdir.mkdir(parents=True, exist_ok=True)
            receiver.config_path.write_text(tomli_w.dumps(receiver.config), encoding="utf-8")
            migrated = run_cli("migrate", "--config", str(receiver.config_path))
            assert migrated.returncode == 0, migrated.stderr
        receiver.start()
        stack.callback(receiver.stop)
        nodes: list[ServeProcess] = []
        for index in range(workers):
            env = worker_env[index] if index < len(worker_env) else None
            node = ServeProcess(
                folder / f"worker{index}",
                {**common, "storage": {**storage, "data_dir": str(mount)}, "queue": {**common["queue"]}},
                command=("worker", "--node-name", f"worker{index}"),
                env=env,
            )
            node.start()
            stack.callback(node.stop)
            nodes.append(node)
        db = open_database(database_url or f"sqlite:///{(shared / 'pacs-bridge.db').resolve()}", upgrade=False)
        stack.callback(db.dispose)
        yield Site(receiver, nodes, db, pacs)
