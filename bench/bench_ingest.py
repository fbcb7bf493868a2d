"""Ingest throughput of ``pacs-bridge serve`` against DCMTK ``storescp``, same client, same machine.

The client is DCMTK's own ``storescu`` (``/usr/bin/storescu``, not a Python
tool of the same name), with ``TCP_NODELAY=1`` in the environment of both
DCMTK programs so that Nagle's algorithm does not set the pace. Sets: small
instances (about 40 KB) and large ones (about 7 MB, a radiograph); one
association, and four in parallel; servers alternated within each
repetition. pacs-bridge runs with fsync on (its default) and, for reference,
off; storescp never fsyncs. The disk's own ceiling is measured too: the same
bytes written, fsynced, linked and their folder fsynced, with no network.

    python bench/bench_ingest.py [--small 500] [--large 40] [--repeat 3]
        [--sets small,large] [--out docs/benchmarks-ingest.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.dicom_files import make_radiograph  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def make_set(folder: Path, count: int, shape: tuple[int, int], parts: int) -> list[Path]:
    """``count`` instances of one study split over ``parts`` sub-folders; returns the sub-folders."""
    rng = np.random.default_rng(0)
    study = None
    subdirs = [folder / f"part{i}" for i in range(parts)]
    base = rng.random(shape)
    for n in range(count):
        ds = make_radiograph(
            base,
            study,
            path=subdirs[n % parts] / f"{n:05d}.dcm",
            instance_number=n + 1,
            bits_stored=16,
        )
        study = str(ds.StudyInstanceUID)
    return subdirs


def run_clients(port: int, subdirs: list[Path], called: str) -> float:
    """Send every sub-folder on its own association, all at once; seconds until the last finishes."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aec", called, "-aet", "BENCH", "-pdu", "131072", "+sd", "127.0.0.1", str(port), str(d)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for d in subdirs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


def bench_storescp(work: Path, subdirs: list[Path]) -> float:
    port = free_port()
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = subprocess.Popen(
        [STORESCP, "--fork", "-aet", "STORESCP", "-pdu", "131072", "+B", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        return run_clients(port, subdirs, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


PLAIN_SCP = """
import os, sys
from pynetdicom import AE, evt, AllStoragePresentationContexts
out = sys.argv[2]
def on_store(event):
    path = os.path.join(out, event.request.AffectedSOPInstanceUID + ".dcm")
    with open(path, "wb") as fh:
        fh.write(event.encoded_dataset())
        fh.flush()
        os.fsync(fh.fileno())
    return 0x0000
ae = AE(ae_title="PLAIN")
ae.maximum_pdu_size = 0
ae.supported_contexts = AllStoragePresentationContexts
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


def bench_plain(work: Path, subdirs: list[Path]) -> float:
    """A plain pynetdicom receiver that writes each data set with fsync: the floor of any pynetdicom design."""
    port = free_port()
    out = work / "plain-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", PLAIN_SCP, str(port), str(out)])
    try:
        wait_port(port)
        return run_clients(port, subdirs, "PLAIN")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_disk(work: Path, subdirs: list[Path]) -> float:
    """No network: write each file, fsync it, link it into place and fsync its folder, one thread per
    association. The ceiling of any receiver that makes each instance durable before answering, on this disk."""
    out = work / "disk-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    payloads = [[f.read_bytes() for f in sorted(d.iterdir())] for d in subdirs]

    def write(index: int) -> None:
        folder = out / f"a{index}"
        folder.mkdir()
        for n, data in enumerate(payloads[index]):
            tmp = folder / f"{n}.part"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, folder / f"{n}.dcm")
            os.unlink(tmp)
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(subdirs))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def bench_bridge(work: Path, subdirs: list[Path], fsync: bool, receivers: int = 1) -> float:
    """``pacs-bridge serve`` as shipped; with ``receivers`` > 1, that many ``serve --roles receive``
    processes on one port (``[dicom] reuse_port``), one spool and one database."""
    port = free_port()
    data = work / "bridge-data"
    shutil.rmtree(data, ignore_errors=True)
    config = {
        "dicom": {"host": "127.0.0.1", "port": port, "ae_title": "PACS_BRIDGE", "reuse_port": receivers > 1},
        "storage": {"data_dir": str(data), "fsync": fsync, "min_free_mb": 1},
        "watch": {"enabled": False},
        "study": {"settle_seconds": 3600},
        "analysis": {"enabled": False},
        "web": {"enabled": False},
        "log": {"level": "INFO"},
    }
    if receivers > 1:
        config["queue"] = {"roles": ["receive"]}
    config_path = work / "bench.toml"
    config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
    command = [sys.executable, "-m", "pacs_bridge.cli"]
    subprocess.run([*command, "migrate", "--config", str(config_path)], check=True, capture_output=True, cwd=work)
    procs = []
    try:
        for index in range(receivers):
            log = work / f"bridge-{index}.log"
            log.unlink(missing_ok=True)
            with open(log, "wb") as handle:
                procs.append(
                    subprocess.Popen(
                        [*command, "serve", "--config", str(config_path)],
                        stdout=subprocess.DEVNULL,
                        stderr=handle,
                        cwd=work,
                    )
                )
            deadline = time.monotonic() + 60
            while b"pacs-bridge ready" not in log.read_bytes():
                if time.monotonic() > deadline or procs[-1].poll() is not None:
                    raise RuntimeError(f"pacs-bridge did not start: {log.read_text(errors='replace')[-500:]}")
                time.sleep(0.05)
        wait_port(port)
        return run_clients(port, subdirs, "PACS_BRIDGE")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-ingest.md")
    parser.add_argument(
        "--sets", default="small,large", help="comma-separated sets to run (small, large); default both"
    )
    args = parser.parse_args()
    if not Path(STORESCU).exists() or not Path(STORESCP).exists():
        print("DCMTK is not installed (apt-get install dcmtk)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        sets = {
            "small": (args.small, (140, 140)),
            "large": (args.large, (1900, 1850)),
        }
        wanted = {name.strip() for name in args.sets.split(",") if name.strip()}
        unknown = wanted - set(sets)
        if unknown:
            parser.error(f"unknown set(s): {', '.join(sorted(unknown))}")
        for label, (count, shape) in sets.items():
            if label not in wanted:
                continue
            for parallel in (1, 4):
                folder = work / f"{label}-{parallel}"
                subdirs = make_set(folder, count, shape, parallel)
                size = sum(f.stat().st_size for d in subdirs for f in d.iterdir()) / count
                times: dict[str, list[float]] = {
                    "storescp": [],
                    "disk": [],
                    "plain": [],
                    "bridge": [],
                    "bridge-nofsync": [],
                    "bridge-2": [],
                }
                for _ in range(args.repeat):
                    times["storescp"].append(bench_storescp(work, subdirs))
                    times["disk"].append(bench_disk(work, subdirs))
                    times["plain"].append(bench_plain(work, subdirs))
                    times["bridge"].append(bench_bridge(work, subdirs, fsync=True))
                    times["bridge-nofsync"].append(bench_bridge(work, subdirs, fsync=False))
                    times["bridge-2"].append(bench_bridge(work, subdirs, fsync=True, receivers=2))
                rate = {k: count / statistics.median(v) for k, v in times.items()}
                rows.append((label, size, count, parallel, rate))
                print(
                    f"{label:5} {size / 1024:8.0f} KiB x{count:4d}  {parallel} assoc  "
                    f"storescp {rate['storescp']:7.1f}/s  disk floor {rate['disk']:7.1f}/s  "
                    f"plain pynetdicom {rate['plain']:7.1f}/s  "
                    f"pacs-bridge {rate['bridge']:7.1f}/s "
                    f"({rate['bridge'] / rate['storescp']:.2f}x)  no fsync {rate['bridge-nofsync']:7.1f}/s "
                    f"({rate['bridge-nofsync'] / rate['storescp']:.2f}x)  two receivers {rate['bridge-2']:7.1f}/s "
                    f"({rate['bridge-2'] / rate['storescp']:.2f}x)",
                    flush=True,
                )
                shutil.rmtree(folder)
    lines = [
        "| set | instance size | instances | associations | storescp (inst/s) "
        "| write + fsync, no network (inst/s) | ratio | plain pynetdicom + fsync (inst/s) "
        "| ratio | pacs-bridge, fsync (inst/s) | ratio | pacs-bridge, no fsync (inst/s) | ratio "
        "| pacs-bridge, 2 receiving processes, fsync (inst/s) | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, size, count, parallel, rate in rows:
        lines.append(
            f"| {label} | {size / 1024:.0f} KiB | {count} | {parallel} | {rate['storescp']:.1f} | "
            f"{rate['disk']:.1f} | {rate['disk'] / rate['storescp']:.2f}x | "
            f"{rate['plain']:.1f} | {rate['plain'] / rate['storescp']:.2f}x | "
            f"{rate['bridge']:.1f} | {rate['bridge'] / rate['storescp']:.2f}x | {rate['bridge-nofsync']:.1f} | "
            f"{rate['bridge-nofsync'] / rate['storescp']:.2f}x | "
            f"{rate['bridge-2']:.1f} | {rate['bridge-2'] / rate['storescp']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
