"""Many associations at once against a real ``pacs-bridge serve``: ``python bench/bench_associations.py``.

20 associations (threads, one pynetdicom AE each) store 100 small DX
instances each at the same time, with 20 % of the instances sent twice on
another association (a PACS resending). Prints the throughput, the
statuses, the serve process's peak RSS (VmHWM) and whether every
acknowledged instance has its row and its intact file. Then, on the same
server, a hostile round: 8 peers trickle their association request, 8 send
a P-DATA-TF PDU that declares 4 GB, one host floods 100 connections, and
one peer streams an instance 4 times larger than [dicom] max_instance_mb;
the peak RSS is printed again. A sender whose association ends early
resends the rest on a new one (counted), and the serve log's warnings are
summarised by message. Figures: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # noqa: E402

from pacs_bridge.store.layout import resolve_stored  # noqa: E402
from tests.support.dicom_files import make_radiograph  # noqa: E402
from tests.support.hostile import associate_rq, connect, pdata_header, read_pdu  # noqa: E402
from tests.support.serve import ServeProcess  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def vm(pid: int, key: str) -> float:
    """A /proc/PID/status memory figure, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sender(port: int, datasets: list, statuses: list[tuple[str, int]], aborted: list[int]) -> None:
    """Store ``datasets``; after an association ends early, resend the rest on a new one (as a PACS does)."""
    pending = list(datasets)
    for _ in range(5):
        ae = AE(ae_title="BENCH_SCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE", max_pdu=65536)
        while pending and assoc.is_established:
            ds = pending[0]
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:
                break
            if not status:
                break  # no answer: the association ended; resend this one
            statuses.append((str(ds.SOPInstanceUID), int(status.Status)))
            pending.pop(0)
        if not pending:
            assoc.release()
            return
        aborted.append(len(pending))
        if assoc.is_established:
            assoc.abort()
    statuses.extend((str(ds.SOPInstanceUID), -1) for ds in pending)


def log_summary(log: str) -> dict[str, int]:
    """WARNING and ERROR lines of the serve log, by message with the UIDs and numbers taken out."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if " WARNING " in line or " ERROR " in line:
            text = re.sub(r"[0-9][0-9.]*", "N", line.split(": ", 1)[-1])[:160]
            counts[text] = counts.get(text, 0) + 1
    return counts


def hostile_round(port: int) -> dict[str, int]:
    """Slow, oversized, flooding and too-large-instance peers at once; how each was answered."""
    # The too-large instance first: under the hostile peers below the listener may be full (a known limit).
    big = make_radiograph(np.random.default_rng(3).random((1500, 1400)), generate_uid(), bits_stored=16)
    ae = AE(ae_title="BIG_SCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE", max_pdu=65536)
    big_status = int(assoc.send_c_store(big).Status) if assoc.is_established else -1
    if assoc.is_established:
        assoc.release()
    stop = threading.Event()
    socks = []
    for n in range(8):
        sock = connect(port, source=f"127.0.1.{n + 1}")
        socks.append(sock)

        def trickle(sock=sock) -> None:
            for byte in associate_rq():
                if stop.wait(0.5):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
    aborted = 0
    for n in range(8):
        sock = connect(port, source=f"127.0.2.{n + 1}")
        sock.sendall(associate_rq(abstract_syntaxes=(DX,)))
        if (read_pdu(sock) or (0,))[0] == 0x02:
            try:
                sock.sendall(pdata_header(0xFFFFFFF0) + b"\x00" * 65536)
                aborted += (read_pdu(sock) or (0,))[0] == 0x07
            except OSError:
                pass
        socks.append(sock)
    flood_refused = 0
    for _ in range(100):
        sock = connect(port, source="127.0.3.1")
        sock.settimeout(0.2)
        try:
            flood_refused += sock.recv(1) == b""
        except TimeoutError:
            pass
        except OSError:
            flood_refused += 1
        socks.append(sock)
    stop.set()
    for sock in socks:
        sock.close()
    return {"pdata_4gb_aborted": aborted, "flood_refused_of_100": flood_refused, "too_large_status": big_status}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--instances", type=int, default=100, help="per association")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pixels = rng.random((256, 256))
    with tempfile.TemporaryDirectory(prefix="pb-assoc-") as tmp:
        config = {
            "dicom": {
                "max_associations": args.associations + 8,
                "max_associations_per_host": args.associations + 4,
                "max_instance_mb": 2,
                "acse_timeout": 5,
                "network_timeout": 10,
            },
            "study": {"settle_seconds": 3600},
        }
        server = ServeProcess(Path(tmp) / "srv", config)
        server.start()
        try:
            assert server.proc is not None
            rss_idle = vm(server.proc.pid, "VmRSS")
            batches = []
            for _ in range(args.associations):
                study_uid = generate_uid()
                batches.append(
                    [make_radiograph(pixels, study_uid, instance_number=n + 1) for n in range(args.instances)]
                )
            for a in range(args.associations):  # 20 % resent on the next association
                batches[a] += batches[(a + 1) % args.associations][: args.instances // 5]
            statuses: list[tuple[str, int]] = []
            aborted: list[int] = []
            threads = [threading.Thread(target=sender, args=(server.port, b, statuses, aborted)) for b in batches]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - started
            rss_peak_store = vm(server.proc.pid, "VmHWM")
            with sqlite3.connect(server.data_dir / "pacs-bridge.db") as conn:
                rows = {
                    uid: resolve_stored(server.data_dir, p)
                    for uid, p in conn.execute("select sop_instance_uid, file_path from instances")
                }
            acknowledged = {uid for uid, status in statuses if status == 0}
            lost = [uid for uid in acknowledged if uid not in rows or not Path(rows[uid]).is_file()]
            broken = [uid for uid in list(acknowledged)[:200] if dcmread(rows[uid]).SOPInstanceUID != uid]
            hostile = hostile_round(server.port)
            time.sleep(7)
            rss_peak_hostile = vm(server.proc.pid, "VmHWM")
            alive = server.proc.poll() is None
        finally:
            server.stop()
        log = server.log()
    sizes = sum(len(b) for b in batches)
    result = {
        "associations": args.associations,
        "stores": sizes,
        "unique_instances": args.associations * args.instances,
        "status_counts": {
            f"0x{s:04X}" if s >= 0 else "none": sum(1 for _, x in statuses if x == s) for s in {x for _, x in statuses}
        },
        "associations_ended_early_then_resent": len(aborted),
        "instances_resent_after_an_early_end": sum(aborted),
        "seconds": round(seconds, 2),
        "stores_per_second": round(sizes / seconds, 1),
        "acknowledged_lost": len(lost),
        "acknowledged_files_not_intact_of_200_checked": len(broken),
        "serve_rss_idle_mib": round(rss_idle, 1),
        "serve_peak_rss_mib_after_stores": round(rss_peak_store, 1),
        "hostile_round": hostile,
        "serve_peak_rss_mib_after_hostile_round": round(rss_peak_hostile, 1),
        "serve_alive": alive,
        "serve_warnings": log_summary(log),
    }
    print(json.dumps(result, indent=2))
    return 0 if alive and not lost and not broken else 1


if __name__ == "__main__":
    raise SystemExit(main())
