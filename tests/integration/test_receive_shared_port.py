"""Two ``serve --roles receive`` processes on one port (``[dicom] reuse_port``), one spool, one SQLite file.

The kernel spreads the associations over both (SO_REUSEPORT); every
acknowledged instance is on disk once, with one row, whichever process took
it, and the same instance sent through both at once is stored once.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from pacs_bridge.send.dimse import keep_responses
from tests.support.dicom_files import make_radiograph
from tests.support.serve import ServeProcess, free_port, run_cli

PIXELS = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.float64)
STORESCU = Path("/usr/bin/storescu")


def _send(port: int, datasets: list[Dataset], statuses: list[int]) -> None:
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE"))
    if not assoc.is_established:
        statuses.extend([-2] * len(datasets))
        return
    for ds in datasets:
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status) if status else -1)
    assoc.release()


def _stored_per_process(log: str) -> int:
    return sum(int(n) for n in re.findall(r"(?:released|closed without release): (\d+) stored", log))


Receivers = tuple[int, list[ServeProcess], Path]


def _associations(log: str) -> int:
    return len(re.findall(r"(?:released|closed without release): \d+ stored", log))


@pytest.fixture()
def receivers(tmp_path: Path) -> Iterator[Receivers]:
    port = free_port()
    shared = {
        "dicom": {"port": port, "reuse_port": True, "max_associations_per_host": 32},
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
        "queue": {"roles": ["receive"]},
    }
    nodes = [ServeProcess(tmp_path / f"node{i}", shared, port=port) for i in range(2)]
    nodes[0].workdir.mkdir(parents=True)
    nodes[0].config_path.write_text(tomli_w.dumps(nodes[0].config), encoding="utf-8")
    migrated = run_cli("migrate", "--config", str(nodes[0].config_path))
    assert migrated.returncode == 0, migrated.stderr
    for node in nodes:
        node.start()
    yield port, nodes, tmp_path / "data"
    for node in nodes:
        node.stop()


def test_two_processes_share_the_port_and_lose_nothing(receivers: Receivers, tmp_path: Path) -> None:
    port, nodes, data = receivers
    assert all("port shared, SO_REUSEPORT" in node.log() for node in nodes)
    study = generate_uid()
    batches = [[make_radiograph(PIXELS, study, instance_number=10 * a + n) for n in range(3)] for a in range(16)]
    statuses: list[int] = []
    threads = [threading.Thread(target=_send, args=(port, batch, statuses)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    sent = {str(ds.SOPInstanceUID): ds for batch in batches for ds in batch}
    assert statuses == [0] * len(sent)

    # DCMTK's storescu on four more associations into the same study.
    folder = tmp_path / "dcmtk"
    for a in range(4):
        for n in range(3):
            ds = make_radiograph(PIXELS, study, instance_number=1000 + 10 * a + n, path=folder / f"a{a}" / f"{n}.dcm")
            sent[str(ds.SOPInstanceUID)] = ds
    if STORESCU.exists():
        procs = [
            subprocess.run(
                [str(STORESCU), "-aec", "PACS_BRIDGE", "-aet", "DCMTK_SCU", "+sd", "127.0.0.1", str(port), str(d)],
                check=False,
                capture_output=True,
                timeout=120,
            )
            for d in sorted(folder.iterdir())
        ]
        assert all(p.returncode == 0 for p in procs), [p.stderr[-300:] for p in procs]
    else:
        sent = {uid: ds for uid, ds in sent.items() if int(ds.InstanceNumber) < 1000}

    for node in nodes:
        node.stop()
    per_process = [_stored_per_process(node.log()) for node in nodes]
    assert sum(per_process) == len(sent)
    assert all(count > 0 for count in per_process), f"one process took every association: {per_process}"
    with sqlite3.connect(data / "pacs-bridge.db") as conn:
        rows = dict(conn.execute("SELECT sop_instance_uid, file_path FROM instances").fetchall())
    assert set(rows) == set(sent)
    for uid, relative in rows.items():
        stored = dcmread(data / relative)
        assert stored.SOPInstanceUID == uid
        assert stored.PixelData == sent[uid].PixelData


def test_the_same_instances_through_both_processes_at_once_are_stored_once(receivers: Receivers) -> None:
    port, nodes, data = receivers
    study = generate_uid()
    same = [make_radiograph(PIXELS, study, instance_number=n) for n in range(4)]
    statuses: list[int] = []
    threads = [threading.Thread(target=_send, args=(port, same, statuses)) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert statuses == [0] * (12 * len(same))  # every copy acknowledged: stored or a duplicate of a stored one
    with sqlite3.connect(data / "pacs-bridge.db") as conn:
        rows = conn.execute("SELECT sop_instance_uid, file_path FROM instances").fetchall()
    assert sorted(uid for uid, _ in rows) == sorted(str(ds.SOPInstanceUID) for ds in same)
    for _, relative in rows:
        assert (data / relative).is_file()
    spool = data / "spool"
    spool_files = [p for p in spool.rglob("*") if p.is_file() and "tmp" not in p.relative_to(spool).parts]
    assert len(spool_files) == len(same)
    for node in nodes:
        node.stop()
    served = [_associations(node.log()) for node in nodes]
    assert sum(served) == 12 and all(served), f"associations per process: {served}"
