"""Data sets written into the spool's temp folder while they arrive, then linked into the spool."""

from __future__ import annotations

import os
from pathlib import Path

from pacs_bridge.receive.streaming import SpoolTempFile, take_write_error
from pacs_bridge.store.spool import Spool


def test_temp_file_is_private_named_for_the_node_and_written_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    staged = SpoolTempFile(spool.tmp, spool.prefix, early_sync=True)
    payload = os.urandom(3 * 1024 * 1024 + 17)  # past the early write-back step, more than once
    for start in range(0, len(payload), 65536):
        assert staged.write(payload[start : start + 65536]) == len(payload[start : start + 65536])
        staged.file.flush()
    staged.close()
    path = Path(staged.name)
    assert path.parent == spool.tmp and path.name.startswith(spool.prefix)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == payload
    assert take_write_error(path) is None


def test_a_failed_write_is_kept_for_the_handler_not_raised(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    staged = SpoolTempFile(spool.tmp, spool.prefix)
    os.close(staged._fd or -1)
    staged._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC, as on a full disk
    assert staged.write(b"x" * 1000) == 1000
    assert staged.write(b"y" * 10) == 10  # later fragments are dropped quietly
    staged.close()
    error = take_write_error(staged.name)
    assert error is not None and error.errno == 28
    assert take_write_error(staged.name) is None, "an error is handed over once"


def test_temp_folder_that_cannot_take_files_gives_an_error_not_an_exception(tmp_path: Path) -> None:
    staged = SpoolTempFile(tmp_path / "missing", "node.1.")
    assert staged.write(b"data") == 4
    staged.close()
    assert isinstance(take_write_error(staged.name), FileNotFoundError)


def test_place_links_the_staged_file_once_and_keeps_the_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    first = SpoolTempFile(spool.tmp, spool.prefix)
    first.write(b"first copy")
    first.close()
    stored = spool.place("1.2.3", "1.2.3.4", Path(first.name))
    assert stored.created and stored.size == len(b"first copy")
    assert stored.path.read_bytes() == b"first copy"
    second = SpoolTempFile(spool.tmp, spool.prefix)
    second.write(b"second copy")
    second.close()
    again = spool.place("1.2.3", "1.2.3.4", Path(second.name))
    assert not again.created
    assert stored.path.read_bytes() == b"first copy"
    # The writer removes its temp names; the spool's link stays.
    os.unlink(first.name)
    os.unlink(second.name)
    assert stored.path.read_bytes() == b"first copy"


def test_place_copies_a_file_from_outside_its_temp_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "data")
    outside = tmp_path / "elsewhere.part"
    outside.write_bytes(b"z" * 3_000_000)
    stored = spool.place("1.2.3", "1.2.3.5", outside)
    assert stored.created and stored.path.read_bytes() == outside.read_bytes()
    assert os.stat(stored.path).st_ino != os.stat(outside).st_ino
    assert not list(spool.tmp.iterdir())
