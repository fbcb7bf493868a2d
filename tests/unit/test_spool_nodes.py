"""Partial spool files name their node: a starting node removes only its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pacs_bridge.store.spool import Spool, temp_prefix


def test_a_starting_node_removes_only_its_own_partial_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False, node="receiver-a")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(gone.stdout)
    live_pid = os.getppid()
    files = {
        "own earlier process": temp_prefix("receiver-a", dead_pid) + "abc123.part",
        "own process id again": temp_prefix("receiver-a", os.getpid()) + "def456.part",
        "own live process": temp_prefix("receiver-a", live_pid) + "ghi789.part",
        "other node": temp_prefix("receiver-b", dead_pid) + "jkl012.part",
        "older version": "tmpmno345.part",
    }
    for name in files.values():
        (spool.tmp / name).write_bytes(b"half")
    assert spool.clean_tmp() == 3
    left = {p.name for p in spool.tmp.iterdir()}
    assert left == {files["own live process"], files["other node"]}


def test_stores_write_their_temp_files_under_their_node(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False, node="rx.example.org")
    assert spool.prefix == f"rx_example_org.{os.getpid()}."
    stored = spool.store("1.2.3", "1.2.3.4", [b"DICM"])
    assert stored.created and stored.path.read_bytes() == b"DICM"
    assert list(spool.tmp.iterdir()) == []
