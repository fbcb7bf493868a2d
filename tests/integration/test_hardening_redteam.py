"""Defects found by trying ``pacs-bridge serve`` as a hostile client would, each fixed and kept fixed here.

- A C-STORE request whose command names one instance (or SOP class) while
  its data set holds another was stored and answered success: the sender
  recorded one instance as safe while another was kept. It is refused with
  0xA900 (PS3.4 B.2.3, data set does not match SOP class), before any byte
  is written, as DCMTK's storescp does.
- Inbox file names went into INFO lines as they were: a file named after
  the patient put the patient's name in the log, and a name with a line
  break or a bidirectional control character forged or disguised log
  lines. INFO lines now name the instance by UID only; lines that must
  name the file (it failed, it waits) show it with every non-printable
  character escaped.

docs/reliability.md lists the whole red-team pass.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid
from pynetdicom.dsutils import encode

from tests.support.dicom_files import make_radiograph
from tests.support.hostile import raw_c_store
from tests.support.serve import ServeProcess

PIXELS = (np.arange(48 * 48).reshape(48, 48) % 199).astype(np.float64)
DX = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
SECRET_NAME = "Ungenannt^Wilhelmine"
SECRET_ID = "PB-SECRET-8086"


def dx(study_uid: str, number: int = 1) -> Dataset:
    """A small DX instance with the test's secret patient identity."""
    return make_radiograph(PIXELS, study_uid, instance_number=number, patient_name=SECRET_NAME, patient_id=SECRET_ID)


def stored_uids(server: ServeProcess) -> set[str]:
    with sqlite3.connect(server.data_dir / "pacs-bridge.db") as conn:
        return {uid for (uid,) in conn.execute("select sop_instance_uid from instances")}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    with ServeProcess(tmp_path / "srv", {"watch": {"stable_seconds": 0.2}}) as srv:
        yield srv


def test_c_store_whose_command_names_another_instance_or_class_is_refused(server: ServeProcess) -> None:
    study_uid = generate_uid()
    ds = dx(study_uid)
    data = encode(ds, False, True)
    assert data is not None
    other_instance = generate_uid()
    assert (
        raw_c_store(server.port, data, command_sop_class=DX, command_sop_instance=other_instance, context_sop_class=DX)
        == 0xA900
    )
    # The command's class differs from the context's and the data set's (pynetdicom would serve it as storage).
    assert (
        raw_c_store(
            server.port, data, command_sop_class=CR, command_sop_instance=ds.SOPInstanceUID, context_sop_class=DX
        )
        == 0xA900
    )
    assert stored_uids(server) == set()
    assert not (server.data_dir / "spool" / study_uid).exists(), "a refused instance left a file"
    # The same bytes under a truthful command are stored.
    assert (
        raw_c_store(
            server.port, data, command_sop_class=DX, command_sop_instance=ds.SOPInstanceUID, context_sop_class=DX
        )
        == 0x0000
    )
    assert stored_uids(server) == {ds.SOPInstanceUID}
    log = server.log()
    assert "does not match the C-STORE request" in log
    assert other_instance not in log  # the request's own values are not trusted into the log either


def _part10(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_inbox_file_names_stay_out_of_info_lines_and_cannot_forge_lines(server: ServeProcess) -> None:
    study_uid = generate_uid()
    inbox = server.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    named = {
        "Ungenannt_Wilhelmine_PB-SECRET-8086.dcm": _part10(dx(study_uid, 1)),
        "scan\nFORGED ERROR line.dcm": _part10(dx(study_uid, 2)),
        "report\u202etxt.dcm": b"not DICOM at all",
        "broken\r\nFORGED WARNING line.dcm": b"not DICOM either",
    }
    for name, data in named.items():
        staging = inbox / f".{len(name)}.part"
        staging.write_bytes(data)
        staging.rename(inbox / name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(not p.name.startswith(".") for p in inbox.iterdir()):
        time.sleep(0.1)
    assert not any(not p.name.startswith(".") for p in inbox.iterdir()), "inbox not emptied"
    assert len(stored_uids(server)) == 2
    log = server.log()
    lines = log.splitlines()
    assert not any(line.startswith("FORGED") for line in lines), "a file name forged a log line"
    assert "Ungenannt" not in log and "SECRET-8086" not in log, "a file name put patient identifiers in the log"
    assert "\u202e" not in log
    assert "report\\u202etxt.dcm failed" in log  # the failing file is still named, escaped
    assert "broken\\r\\nFORGED WARNING line.dcm failed" in log
    assert log.count("ingested as") == 2
