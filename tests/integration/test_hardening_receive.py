"""The receiving side under faults: concurrent duplicates, unreadable attributes, hostile inbox entries, modes, logs.

Every test runs a real ``pacs-bridge serve`` and real associations; each one
failed on the code before the receiving side was hardened (see
docs/reliability.md for the defect each guards against).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from pacs_bridge.send.dimse import keep_responses
from pacs_bridge.store.layout import resolve_stored
from tests.support.dicom_files import make_radiograph
from tests.support.hostile import deflate_bomb, raw_file_store, set_element_vr
from tests.support.serve import ServeProcess

PIXELS = (np.arange(48 * 48).reshape(48, 48) % 199).astype(np.float64)
SECRET_NAME = "Verborgen^Hildegard^Maria"
SECRET_ID = "PB-SECRET-4242"


def dx(study_uid: str, number: int = 1, **kwargs: object) -> Dataset:
    """A small DX instance with the test's secret patient identity."""
    kwargs.setdefault("patient_name", SECRET_NAME)
    kwargs.setdefault("patient_id", SECRET_ID)
    return make_radiograph(PIXELS, study_uid, instance_number=number, **kwargs)  # type: ignore[arg-type]


def associate(port: int) -> object:
    ae = AE(ae_title="HARDENING")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE"))
    assert assoc.is_established
    return assoc


def store(port: int, datasets: list[Dataset]) -> list[int]:
    assoc = associate(port)
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds)  # type: ignore[attr-defined]
        statuses.append(int(status.Status) if status else -1)
    assoc.release()  # type: ignore[attr-defined]
    return statuses


def rows(server: ServeProcess, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(server.data_dir / "pacs-bridge.db") as conn:
        return conn.execute(sql).fetchall()


def wait_until(predicate: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def server(tmp_path: Path) -> ServeProcess:
    with ServeProcess(tmp_path / "srv") as srv:
        yield srv  # type: ignore[misc]


def _send_together(assoc: object, barrier: threading.Barrier, datasets: list[Dataset], statuses: list[int]) -> None:
    barrier.wait()
    for ds in datasets:
        status = assoc.send_c_store(ds)  # type: ignore[attr-defined]
        statuses.append(int(status.Status) if status else -1)  # list.append is atomic
    assoc.release()  # type: ignore[attr-defined]


def test_same_instance_on_six_associations_at_once_keeps_its_file(server: ServeProcess) -> None:
    """A PACS resending after a timeout: both copies acknowledged, the file of the acknowledged row stays."""
    for _round in range(6):
        study_uid = generate_uid()
        datasets = [dx(study_uid, n + 1) for n in range(4)]
        associations = [associate(server.port) for _ in range(6)]
        barrier = threading.Barrier(len(associations))
        statuses: list[int] = []
        threads = [threading.Thread(target=_send_together, args=(a, barrier, datasets, statuses)) for a in associations]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert statuses == [0] * 24, statuses
        for ds in datasets:
            uid = ds.SOPInstanceUID
            found = rows(server, f"select file_path from instances where sop_instance_uid = '{uid}'")
            assert len(found) == 1, uid
            path = resolve_stored(server.data_dir, str(found[0][0]))
            assert path.is_file(), f"acknowledged instance {uid} has a row but no file"
            assert dcmread(path).SOPInstanceUID == uid
    assert not list((server.data_dir / "tmp").iterdir())


def _unknown_vr_file(folder: Path, study_uid: str, number: int, tag: tuple[int, int]) -> tuple[Path, str]:
    ds = dx(study_uid, number)
    path = folder / f"unknown-vr-{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(set_element_vr(path.read_bytes(), tag, b"ZZ"))
    return path, str(ds.SOPInstanceUID)


def test_unreadable_patient_name_or_accession_is_refused_before_any_file_and_restart_works(
    tmp_path: Path,
) -> None:
    server = ServeProcess(tmp_path / "srv")
    server.start()
    try:
        study_uid = generate_uid()
        good = dx(study_uid, 1)
        assert store(server.port, [good]) == [0]
        assoc = associate(server.port)
        refused = []
        for number, tag in ((2, (0x0010, 0x0010)), (3, (0x0008, 0x0050))):
            path, uid = _unknown_vr_file(tmp_path, study_uid, number, tag)
            assert raw_file_store(assoc, str(path)) == 0xC210
            refused.append(uid)
        assoc.release()  # type: ignore[attr-defined]
        spooled = {p.stem for p in (server.data_dir / "spool").glob("*/*.dcm")}
        assert spooled == {good.SOPInstanceUID}, "a refused instance left its file in the spool"

        # The same files through the folder: failed/ with the reason, nothing in the spool.
        server.inbox.mkdir(parents=True, exist_ok=True)
        for number, tag in ((4, (0x0010, 0x0010)), (5, (0x0008, 0x0050))):
            path, _uid = _unknown_vr_file(tmp_path, study_uid, number, tag)
            os.replace(path, server.inbox / path.name)
        assert wait_until(lambda: not list(server.inbox.iterdir()))
        reasons = [p.read_text() for p in (server.data_dir / "failed").glob("*.reason.txt")]
        assert len(reasons) == 2 and all("0xC210" in r for r in reasons), reasons

        # A spool file that cannot be indexed, as an earlier version or a crash could leave it.
        orphan, orphan_uid = _unknown_vr_file(tmp_path, study_uid, 6, (0x0010, 0x0010))
        os.replace(orphan, server.data_dir / "spool" / study_uid / f"{orphan_uid}.dcm")
        later = dx(study_uid, 7)
        assert store(server.port, [later]) == [0]
    finally:
        assert server.stop() == 0
    server.start()  # must start: the orphan is reported and moved aside, not raised
    try:
        stored = {uid for (uid,) in rows(server, "select sop_instance_uid from instances")}
        assert stored == {good.SOPInstanceUID, later.SOPInstanceUID}
        for uid in stored:
            assert (server.data_dir / "spool" / study_uid / f"{uid}.dcm").is_file()
        assert not (server.data_dir / "spool" / study_uid / f"{orphan_uid}.dcm").exists()
        kept = [p for p in (server.data_dir / "failed").glob("spool-*") if not p.name.endswith(".reason.txt")]
        assert len(kept) == 1 and kept[0].name.endswith(f"{orphan_uid}.dcm")
        assert "left out of the index" in server.log()
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_inbox_entries_that_are_not_regular_files_fail_once_and_never_block(
    server: ServeProcess, tmp_path: Path
) -> None:
    inbox = server.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = dx(study_uid, 1, path=outside / "outside.dcm")
    (outside / "sub").mkdir()
    dx(study_uid, 2, path=outside / "sub" / "deep.dcm")
    os.mkfifo(inbox / "pipe.dcm")
    (inbox / "link.dcm").symlink_to(outside / "outside.dcm")
    (inbox / "linked-folder").symlink_to(outside / "sub", target_is_directory=True)
    bad, _uid = _unknown_vr_file(tmp_path, study_uid, 3, (0x0010, 0x0010))
    os.replace(bad, inbox / "unknown-vr.dcm")
    (inbox / "notes.txt").write_text("not DICOM")

    assert wait_until(lambda: not list(inbox.iterdir()), timeout=20)
    time.sleep(3)  # several more scans: nothing may be retried
    log = server.log()
    for name in ("pipe.dcm", "link.dcm", "linked-folder", "unknown-vr.dcm", "notes.txt"):
        assert log.count(f"inbox file {name} failed") == 1, (name, log[-3000:])
    reasons = "\n".join(p.read_text() for p in (server.data_dir / "failed").glob("*.reason.txt"))
    assert "FIFO" in reasons and "symbolic link" in reasons and "0xC210" in reasons
    # Nothing outside the inbox was read, ingested or moved.
    assert (outside / "outside.dcm").is_file() and (outside / "sub" / "deep.dcm").is_file()
    assert rows(server, "select count(*) from instances") == [(0,)]
    assert secret.SOPInstanceUID not in log
    # A good file after all that is ingested as usual.
    good = dx(study_uid, 9, path=tmp_path / "good.dcm")
    os.replace(tmp_path / "good.dcm", inbox / "good.dcm")
    assert wait_until(lambda: rows(server, "select count(*) from instances") == [(1,)])
    assert f"ingested as {good.SOPInstanceUID}" in server.log()
    assert server.log().count("Traceback") == 0


def test_truncated_pixels_and_dot_uids_are_refused_over_c_store(server: ServeProcess) -> None:
    study_uid = generate_uid()
    truncated = dx(study_uid, 1)
    truncated.PixelData = truncated.PixelData[:-1000]
    statuses = store(server.port, [truncated])
    assert statuses == [0xC210]
    dotted = []
    for uid in (".", "..", "1.2.", ".1.2", "1..2", "1.02.3"):
        ds = dx(study_uid, 2)
        ds.StudyInstanceUID = uid
        dotted.append(ds)
    assert store(server.port, dotted) == [0xC210] * len(dotted)
    assert list((server.data_dir / "spool").iterdir()) == []
    assert "pixel data truncated" in server.log()


def test_files_are_private_and_no_patient_identifier_reaches_the_log(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "srv")
    os.umask(0o022)  # the usual umask: the service must not depend on it
    server.start()
    try:
        study_uid = generate_uid()
        assert store(server.port, [dx(study_uid, 1), dx(study_uid, 2)]) == [0, 0]
        # An invalid character in Patient ID makes pydicom warn with the raw value.
        odd = dx(study_uid, 3, patient_id=SECRET_ID + "\x01")
        assert store(server.port, [odd])[0] in (0x0000, 0xC210)
        assoc = associate(server.port)
        path, _uid = _unknown_vr_file(tmp_path, study_uid, 4, (0x0010, 0x0010))
        assert raw_file_store(assoc, str(path)) == 0xC210
        assoc.release()  # type: ignore[attr-defined]
        server.inbox.mkdir(parents=True, exist_ok=True)
        (server.inbox / "junk.dcm").write_bytes(b"\x00" * 300)
        assert wait_until(lambda: not list(server.inbox.iterdir()))
        data = server.data_dir
        wal = data / "pacs-bridge.db-wal"
        private_files = [data / "pacs-bridge.db", *data.glob("spool/*/*.dcm"), *data.glob("failed/*")]
        if wal.exists():
            private_files += [wal, data / "pacs-bridge.db-shm"]
        for item in private_files:
            assert stat.S_IMODE(item.stat().st_mode) == 0o600, item
        for folder in (data, data / "spool", data / "tmp", data / "failed", *data.glob("spool/*")):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    finally:
        server.stop()
    log = server.log()
    for secret in (SECRET_NAME, SECRET_ID, "Verborgen", "Hildegard", "SECRET-4242"):
        assert secret not in log, f"{secret!r} in the serve log"


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def test_deflate_bomb_is_refused_without_being_inflated(tmp_path: Path) -> None:
    """256 KiB that inflate to 256 MiB: refused over C-STORE (0xA700) and through the folder, memory flat."""
    with ServeProcess(tmp_path / "srv", {"dicom": {"max_instance_mb": 8}}) as server:
        assert server.proc is not None
        before = _peak_rss_mib(server.proc.pid)
        study_uid = generate_uid()
        bomb = tmp_path / "bomb.dcm"
        bomb.write_bytes(deflate_bomb(256 << 20, generate_uid(), study_uid, generate_uid()))
        assert bomb.stat().st_size < 1 << 20
        ae = AE(ae_title="HARDENING")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1.99")
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE")
        assert assoc.is_established
        assert raw_file_store(assoc, str(bomb)) == 0xA700
        assoc.release()
        server.inbox.mkdir(parents=True, exist_ok=True)
        (server.inbox / "bomb.dcm").write_bytes(deflate_bomb(256 << 20, generate_uid(), study_uid, generate_uid()))
        assert wait_until(lambda: not list(server.inbox.iterdir()))
        reasons = "".join(p.read_text() for p in (server.data_dir / "failed").glob("*.reason.txt"))
        assert "inflates past" in reasons
        assert list((server.data_dir / "spool").glob("*/*.dcm")) == []
        assert _peak_rss_mib(server.proc.pid) - before < 64, "the bomb was inflated"
