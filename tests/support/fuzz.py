"""Run mutated instances against a ``pacs-bridge serve`` and check that nothing acknowledged is lost.

Used by ``tests/integration/test_hardening_fuzz.py`` (a few hundred inputs)
and ``bench/bench_fuzz.py`` (thousands). Over C-STORE each mutant is sent
byte for byte (pynetdicom's chunked sending, no re-encoding) on an
association that proposes Secondary Capture in every accepted transfer
syntax; a C-ECHO on a fresh association checks the listener between
batches. Through the folder, mutants (File Meta Information included,
sometimes mutated) are dropped into the inbox. Afterwards every
acknowledged instance must have its row and its spool file, holding the
bytes that were sent.
"""

from __future__ import annotations

import io
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import UID, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_bridge.receive.scp import TRANSFER_SYNTAXES
from pacs_bridge.store.layout import resolve_stored
from tests.support.hostile import raw_file_store
from tests.support.mutate import SECONDARY_CAPTURE, Mutator, meta_end
from tests.support.serve import ServeProcess

__all__ = ["FuzzReport", "echo", "fuzz_cstore", "fuzz_folder", "verify_acknowledged"]


@dataclass
class FuzzReport:
    """What a fuzz run did and found."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    acknowledged: list[tuple[str, bytes]] = field(default_factory=list)
    unreadable_acknowledged: int = 0
    reconnects: int = 0
    echoes: int = 0
    echo_failures: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    folder_files: int = 0
    folder_ingested: int = 0
    folder_failed: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Plain figures for printing."""
        return {
            "sent": self.sent,
            "statuses": {f"0x{k:04X}" if k >= 0 else "none": v for k, v in sorted(self.statuses.items())},
            "acknowledged": len(self.acknowledged),
            "reconnects": self.reconnects,
            "echoes": self.echoes,
            "echo_failures": self.echo_failures,
            "folder_files": self.folder_files,
            "folder_ingested": self.folder_ingested,
            "folder_failed": self.folder_failed,
            "seconds": round(self.seconds, 1),
        }


def echo(port: int) -> bool:
    """C-ECHO on a fresh association; True if answered with success."""
    ae = AE(ae_title="FUZZ_ECHO")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


def _associate(port: int) -> Any:
    ae = AE(ae_title="FUZZER")
    for ts in TRANSFER_SYNTAXES:
        ae.add_requested_context(SECONDARY_CAPTURE, ts)
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    return ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE", max_pdu=65536)


def _sop_uid(dataset_bytes: bytes, transfer_syntax: str) -> str | None:
    """The SOP Instance UID as the server reads it (the same decoder), or None."""
    ts = UID(transfer_syntax)
    try:
        ds = decode(io.BytesIO(dataset_bytes), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        return str(ds.SOPInstanceUID).strip("\x00 ")
    except Exception:
        return None


def fuzz_cstore(server: ServeProcess, mutator: Mutator, count: int, workdir: Path, echo_every: int = 50) -> FuzzReport:
    """Send ``count`` mutants over C-STORE."""
    report = FuzzReport()
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    assoc = _associate(server.port)
    study_uid = generate_uid()
    for n in range(count):
        if n % 10 == 0:
            study_uid = generate_uid()
        mutant = mutator.mutant(study_uid)
        report.labels[re.sub(r"\d+", "N", mutant.label.split(";")[0])] += 1
        path = workdir / "mutant.dcm"
        path.write_bytes(mutant.data)
        if not assoc.is_established:
            assoc = _associate(server.port)
            report.reconnects += 1
        try:
            status = raw_file_store(assoc, str(path))
        except Exception:
            status = -1
        report.sent += 1
        report.statuses[status] += 1
        if status == 0:
            dataset_bytes = mutant.data[meta_end(mutant.data) :]
            sop_uid = _sop_uid(dataset_bytes, mutant.transfer_syntax)
            if sop_uid is None:
                report.unreadable_acknowledged += 1
            else:
                report.acknowledged.append((sop_uid, dataset_bytes))
        if (n + 1) % echo_every == 0:
            report.echoes += 1
            if not echo(server.port):
                report.echo_failures += 1
    if assoc.is_established:
        assoc.release()
    report.seconds = time.monotonic() - started
    return report


def fuzz_folder(server: ServeProcess, mutator: Mutator, count: int, timeout: float = 300.0) -> FuzzReport:
    """Drop ``count`` mutants into the inbox and wait until every one is ingested or failed."""
    report = FuzzReport()
    started = time.monotonic()
    inbox = server.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    failed = server.data_dir / "failed"
    before = len(list(failed.glob("*.reason.txt"))) if failed.exists() else 0
    for n in range(count):
        if n % 10 == 0:
            study_uid = generate_uid()
        mutant = mutator.mutant(study_uid, meta_too=True)
        tmp = inbox / f".fuzz-{n:06d}.dcm.part"
        tmp.write_bytes(mutant.data)
        tmp.rename(inbox / f"fuzz-{n:06d}.dcm")
        report.sent += 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.name.startswith("fuzz-") for p in inbox.iterdir()):
        time.sleep(0.25)
    report.folder_files = count
    report.folder_failed = (len(list(failed.glob("*.reason.txt"))) if failed.exists() else 0) - before
    report.folder_ingested = server.log().count("ingested as")
    report.seconds = time.monotonic() - started
    return report


def verify_acknowledged(server: ServeProcess, acknowledged: list[tuple[str, bytes]]) -> list[str]:
    """Acknowledged SOP Instance UIDs with no row, no file, or a file without the sent bytes."""
    with sqlite3.connect(server.data_dir / "pacs-bridge.db") as conn:
        rows = dict(conn.execute("select sop_instance_uid, file_path from instances").fetchall())
    seen: Counter[str] = Counter(uid for uid, _ in acknowledged)
    lost = []
    for uid, dataset_bytes in acknowledged:
        stored = rows.get(uid)
        path = resolve_stored(server.data_dir, stored) if stored is not None else None
        if path is None or not Path(path).is_file():
            lost.append(uid)
            continue
        if seen[uid] == 1 and not Path(path).read_bytes().endswith(dataset_bytes):
            lost.append(uid)  # a single acknowledgement must have kept exactly what was sent
    return lost
