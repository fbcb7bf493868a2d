"""A full disk: refused with 0xA700, nothing partial, and back to normal alone once space is freed.

The data folder lives on a 20 MiB tmpfs mounted for the test (root only;
skipped with the reason otherwise), with [storage] min_free_mb = 0 so that
the writes themselves meet ENOSPC, in the spool and in SQLite.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from pacs_bridge.store.layout import resolve_stored
from tests.support.dicom_files import make_radiograph
from tests.support.fuzz import echo
from tests.support.serve import ServeProcess


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(folder)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def test_full_disk_refuses_cleanly_and_recovers_alone(tmp_path: Path, small_disk: Path) -> None:
    data = small_disk / "data"
    config = {"storage": {"data_dir": str(data), "min_free_mb": 0}}
    with ServeProcess(tmp_path / "srv", config) as server:
        filler = small_disk / "filler"
        free = shutil.disk_usage(small_disk).free
        with open(filler, "wb") as fh:
            fh.write(b"\xff" * max(0, free - 3 * 1024 * 1024))
        study_uid = generate_uid()
        rng = np.random.default_rng(7)
        datasets = [make_radiograph(rng.random((512, 1024)), study_uid, instance_number=n + 1) for n in range(8)]
        ae = AE(ae_title="DISK_SCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
        assert 0xA700 in statuses, statuses
        assert set(statuses) <= {0x0000, 0xA700}, statuses
        filler.unlink()  # space comes back; no restart
        retried = [int(assoc.send_c_store(ds).Status) for ds, s in zip(datasets, statuses, strict=True) if s != 0]
        assoc.release()
        assert retried == [0] * len(retried), retried
        assert echo(server.port)
        assert server.proc is not None and server.proc.poll() is None
        with sqlite3.connect(data / "pacs-bridge.db") as conn:
            indexed = {
                uid: resolve_stored(data, p)
                for uid, p in conn.execute("select sop_instance_uid, file_path from instances")
            }
        assert set(indexed) == {ds.SOPInstanceUID for ds in datasets}
        assert set(indexed.values()) == set(data.glob("spool/*/*.dcm")), "a partial or unindexed spool file"
        for path in indexed.values():
            assert path.stat().st_size > 1024 * 1024
        assert not list((data / "tmp").iterdir())
    assert "refused (0xA700)" in server.log()
