"""``pacs-bridge serve`` receiving over real DICOM associations (pynetdicom and DCMTK clients)."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, DigitalXRayImageStorageForPresentation, Verification

from pacs_bridge.send.dimse import keep_responses
from tests.support.dicom_files import make_radiograph
from tests.support.serve import ServeProcess

DCMTK = shutil.which("storescu") is not None and Path("/usr/bin/storescu").exists()

PIXELS = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.float64)


def dx(study_uid: str, number: int = 1, **kwargs: object) -> Dataset:
    """A small DX instance of ``study_uid``."""
    return make_radiograph(PIXELS, study_uid, instance_number=number, **kwargs)  # type: ignore[arg-type]


def store(port: int, datasets: list[Dataset], calling: str = "TEST_SCU", called: str = "PACS_BRIDGE") -> list[int]:
    """C-STORE each data set on one association; the statuses (-1 for no answer)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title=called))
    assert assoc.is_established, "association not established"
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status) if status else -1)
    assoc.release()
    return statuses


def send_counting(port: int, datasets: list[Dataset], acknowledged: list[str]) -> None:
    """C-STORE on one association until it ends; append each SOP Instance UID answered with success."""
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE"))
    for ds in datasets:
        if not assoc.is_established:
            return
        try:
            status = assoc.send_c_store(ds)
        except RuntimeError:
            return
        if status and status.Status == 0:
            acknowledged.append(ds.SOPInstanceUID)
    if assoc.is_established:
        assoc.release()


def rows(server: ServeProcess, sql: str) -> list[tuple[object, ...]]:
    """Query the server's SQLite file directly."""
    with sqlite3.connect(server.data_dir / "pacs-bridge.db") as conn:
        return conn.execute(sql).fetchall()


def spool_files(server: ServeProcess) -> list[Path]:
    """Every file in the spool; also asserts no partial file is left in tmp/."""
    return sorted((server.data_dir / "spool").glob("*/*.dcm"))


@pytest.fixture
def server(tmp_path: Path) -> ServeProcess:
    with ServeProcess(tmp_path / "srv") as srv:
        yield srv  # type: ignore[misc]


def test_echo_with_pynetdicom_and_dcmtk(server: ServeProcess) -> None:
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(Verification)
    assoc = keep_responses(ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    if not DCMTK:
        pytest.skip("DCMTK echoscu not installed")
    proc = subprocess.run(
        ["echoscu", "-aec", "PACS_BRIDGE", "-aet", "DCMTK", "127.0.0.1", str(server.port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not DCMTK, reason="DCMTK storescu not installed")
def test_dcmtk_storescu_100_instances_settle_once(server: ServeProcess, tmp_path: Path) -> None:
    study_uid = generate_uid()
    folder = tmp_path / "study"
    series_uid = generate_uid()
    for n in range(100):
        dx(study_uid, n + 1, series_uid=series_uid, path=folder / f"{n:03d}.dcm")
    proc = subprocess.run(
        ["storescu", "-aec", "PACS_BRIDGE", "-aet", "DCMTK", "+sd", "-xs", "127.0.0.1", str(server.port), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rows(
        server,
        f"select count(*) from instances join studies on studies.id = study_id "
        f"where study_instance_uid = '{study_uid}'",
    ) == [(100,)]
    row = server.wait_for_state(study_uid, {"queued", "skipped", "done"})
    assert row["instances"] == 100
    assert row["state"] == "queued"  # analysis is off in this server: it stays queued
    time.sleep(1.5)
    assert server.log().count(f"study {study_uid} settled") == 1
    assert len(spool_files(server)) == 100
    assert not list((server.data_dir / "tmp").iterdir())


def test_duplicate_is_idempotent_and_late_instance_resettles(server: ServeProcess) -> None:
    study_uid = generate_uid()
    first = dx(study_uid, 1)
    assert store(server.port, [first, first]) == [0, 0]
    assert rows(server, f"select count(*) from instances where sop_instance_uid = '{first.SOPInstanceUID}'") == [(1,)]
    elsewhere = dx(generate_uid(), 1, sop_instance_uid=first.SOPInstanceUID)  # a sender re-using a UID
    assert store(server.port, [elsewhere]) == [0]
    assert [f.stem for f in spool_files(server)] == [first.SOPInstanceUID]
    assert dcmread(spool_files(server)[0]).StudyInstanceUID == study_uid
    server.wait_for_state(study_uid, {"queued"})
    assert store(server.port, [dx(study_uid, 2)]) == [0]
    row = server.wait_for_state(study_uid, {"queued"})
    assert row["instances"] == 2
    assert server.log().count(f"study {study_uid} settled") == 2


def test_bad_input_gets_clear_status_and_nothing_partial(server: ServeProcess) -> None:
    study_uid = generate_uid()
    good = dx(study_uid, 1)
    assert store(server.port, [good]) == [0]

    traversal = dx(study_uid, 2)
    traversal.SOPInstanceUID = "1.2.3/../../etc"
    letters = dx(study_uid, 4)
    letters.StudyInstanceUID = "1.2.abc"
    statuses = store(server.port, [traversal, letters])
    assert statuses == [0xC210, 0xC210], statuses
    # Unsupported SOP class: no presentation context, a clean refusal, server still up.
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE")
    assert not assoc.is_established
    # Called AE title that is not ours: rejected.
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SOMEONE_ELSE")
    assert assoc.is_rejected
    time.sleep(0.2)
    assert "to called AE title SOMEONE_ELSE rejected" in server.log()
    # Only the good instance is stored, untouched.
    files = spool_files(server)
    assert [f.stem for f in files] == [good.SOPInstanceUID]
    assert dcmread(files[0]).SOPInstanceUID == good.SOPInstanceUID
    assert not list((server.data_dir / "tmp").iterdir())
    assert store(server.port, [dx(study_uid, 5)]) == [0]
    assert "is not a valid UID" in server.log()


def test_abort_mid_transfer_leaves_nothing_partial(server: ServeProcess) -> None:
    study_uid = generate_uid()
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE")
    assert assoc.send_c_store(dx(study_uid, 1)).Status == 0
    # The peer vanishes in the middle of a P-DATA-TF PDU (PS3.8 9.3.5) announcing 1 MB.
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBI", 0x04, 0, 1_000_000) + b"\x00" * 4096)
    raw.shutdown(socket.SHUT_RDWR)
    raw.close()
    time.sleep(1.0)
    assert len(spool_files(server)) == 1
    assert not list((server.data_dir / "tmp").iterdir())
    assert "closed without release" in server.log() or "aborted" in server.log()
    assert store(server.port, [dx(study_uid, 3)]) == [0]


def test_allow_list_and_size_and_disk_limits(tmp_path: Path) -> None:
    config = {
        "dicom": {"allowed_calling_aets": ["GOOD_SCU", "HOSTBOUND@10.9.9.9"], "max_instance_mb": 0.05},
    }
    with ServeProcess(tmp_path / "srv", config) as server:
        study_uid = generate_uid()
        ae = AE(ae_title="EVIL_SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE")
        assert assoc.is_rejected
        ae = AE(ae_title="HOSTBOUND")
        ae.add_requested_context(Verification)
        assert ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE").is_rejected
        assert store(server.port, [dx(study_uid, 1)], calling="GOOD_SCU") == [0]
        big = make_radiograph(np.random.default_rng(0).random((256, 256)), study_uid, instance_number=2)
        assert store(server.port, [big], calling="GOOD_SCU") == [0xA700]
        assert "rejected: calling AE title not in" in server.log()
    with ServeProcess(tmp_path / "full", {"storage": {"min_free_mb": 1e12}}) as server:
        assert store(server.port, [dx(generate_uid(), 1)]) == [0xA700]
        assert spool_files(server) == []
        assert not list((server.data_dir / "tmp").iterdir())
        assert "below the watermark" in server.log()


def test_folder_watcher_ingests_and_fails_with_reason(server: ServeProcess, tmp_path: Path) -> None:
    study_uid = generate_uid()
    server.inbox.mkdir(parents=True, exist_ok=True)
    good = dx(study_uid, 1, path=tmp_path / "good.dcm")
    shutil.copy(tmp_path / "good.dcm", server.inbox / "good.dcm")
    (server.inbox / "notes.txt").write_text("not DICOM at all")
    whole = (tmp_path / "good.dcm").read_bytes()
    dx(study_uid, 2, path=tmp_path / "second.dcm")
    (server.inbox / "truncated.dcm").write_bytes((tmp_path / "second.dcm").read_bytes()[: len(whole) - 2000])
    no_uid = dx(study_uid, 3)
    del no_uid.SOPInstanceUID
    no_uid.preamble = b"\x00" * 128
    no_uid.save_as(server.inbox / "no-uid.dcm", enforce_file_format=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and list(server.inbox.iterdir()):
        time.sleep(0.2)
    assert list(server.inbox.iterdir()) == []
    assert [f.stem for f in spool_files(server)] == [good.SOPInstanceUID]
    failed = server.data_dir / "failed"
    reasons = {p.name: p.read_text() for p in failed.glob("*.reason.txt")}
    assert len(reasons) == 3, reasons
    text = "\n".join(reasons.values())
    assert "not a DICOM file" in text
    assert "truncated" in text
    assert "missing SOPInstanceUID" in text
    server.wait_for_state(study_uid, {"queued"})


def test_sigterm_exits_cleanly_and_restart_resumes(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "srv", {"study": {"settle_seconds": 30}})
    server.start()
    study_uid = generate_uid()
    assert store(server.port, [dx(study_uid, 1)]) == [0]
    assert server.stop() == 0
    assert "pacs-bridge stopped" in server.log()
    server.config["study"]["settle_seconds"] = 0.5
    server.start()
    try:
        row = server.wait_for_state(study_uid, {"queued"})
        assert row["instances"] == 1
    finally:
        server.stop()


def test_invalid_configuration_is_a_clear_error(tmp_path: Path) -> None:
    from tests.support.serve import run_cli

    bad = tmp_path / "bad.toml"
    bad.write_text('[dicom]\nport = 99999\nae_title = "THIS_TITLE_IS_MUCH_TOO_LONG"\n')
    proc = run_cli("serve", "--config", str(bad))
    assert proc.returncode == 2
    assert "dicom.port" in proc.stderr
    assert "dicom.ae_title" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kill_9_during_200_instances_loses_nothing_acknowledged(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "srv", {"study": {"settle_seconds": 0.5}})
    server.start()
    study_uid = generate_uid()
    series_uid = generate_uid()
    datasets = [dx(study_uid, n + 1, series_uid=series_uid) for n in range(200)]
    acknowledged: list[str] = []

    sender = threading.Thread(target=send_counting, args=(server.port, datasets, acknowledged), daemon=True)
    sender.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill9()
    sender.join(timeout=60)
    assert 60 <= len(acknowledged) < 200, len(acknowledged)
    server.start()
    try:
        stored = {uid for (uid,) in rows(server, "select sop_instance_uid from instances")}
        on_disk = {f.stem for f in spool_files(server)}
        lost = [uid for uid in acknowledged if uid not in stored or uid not in on_disk]
        assert lost == [], f"{len(lost)} acknowledged instances lost"
        for uid in acknowledged[:: max(1, len(acknowledged) // 10)]:
            assert dcmread(server.data_dir / "spool" / study_uid / f"{uid}.dcm").SOPInstanceUID == uid
        assert not list((server.data_dir / "tmp").iterdir())
        row = server.wait_for_state(study_uid, {"queued"})
        assert row["instances"] >= len(acknowledged)
    finally:
        server.stop()


def test_sigterm_while_receiving_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "srv")
    server.start()
    study_uid = generate_uid()
    datasets = [dx(study_uid, n + 1) for n in range(100)]
    acknowledged: list[str] = []

    sender = threading.Thread(target=send_counting, args=(server.port, datasets, acknowledged), daemon=True)
    sender.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stop() == 0  # SIGTERM: no new associations, the open one may finish
    sender.join(timeout=60)
    stored = {uid for (uid,) in rows(server, "select sop_instance_uid from instances")}
    assert set(acknowledged) <= stored
    assert {f.stem for f in spool_files(server)} == stored
    assert not list((server.data_dir / "tmp").iterdir())
    assert "pacs-bridge stopped" in server.log()
