"""Index commits in one and two processes on one SQLite file: is the database what stops a second receiver?

Each process commits ``--count`` small rows, one write transaction each
(``BEGIN IMMEDIATE``, one INSERT, COMMIT), with the pragmas the service sets
(``pacs_bridge.store.db``: WAL, ``synchronous=NORMAL``, ``busy_timeout``) and
a pause between commits that stands for the rest of an instance's work. The
second pair of rows also takes an exclusive ``flock(2)`` around each
transaction, which wakes a waiter at once instead of SQLite's busy handler,
whose sleeps start at 1 ms. The reference is one process: two processes
should commit about twice as many rows per second, and the commit's own
time (median, 99th percentile) says how long a store waits on the database.

    python bench/bench_index_commit.py [--count 2000] [--pause-ms 0.5]
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pacs_bridge.store.db import _sqlite_pragmas  # noqa: E402


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    _sqlite_pragmas(conn, None)  # the service's own connection set-up
    return conn


def _commits(
    path: Path, count: int, pause: float, use_flock: bool, results: multiprocessing.Queue[list[float]]
) -> None:
    conn = _connect(path)
    lock = open(path.with_suffix(".lock"), "a+") if use_flock else None
    times = []
    for index in range(count):
        start = time.perf_counter()
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO row(value) VALUES (?)", (f"{index:064d}",))
        conn.execute("COMMIT")
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
        times.append(time.perf_counter() - start)
        time.sleep(pause)
    results.put(times)


def run(folder: Path, processes: int, count: int, pause: float, use_flock: bool) -> dict[str, float]:
    path = folder / f"index-{processes}-{int(use_flock)}.db"
    conn = _connect(path)
    conn.execute("CREATE TABLE row(id INTEGER PRIMARY KEY, value TEXT)")
    conn.close()
    results: multiprocessing.Queue[list[float]] = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_commits, args=(path, count, pause, use_flock, results))
        for _ in range(processes)
    ]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    times = [t for _ in workers for t in results.get()]
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - start
    times.sort()
    return {
        "rows_per_s": processes * count / wall,
        "p50_ms": statistics.median(times) * 1e3,
        "p99_ms": times[int(len(times) * 0.99)] * 1e3,
        "max_ms": times[-1] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="commits per process")
    parser.add_argument("--pause-ms", type=float, default=0.5, help="pause between commits (the rest of a store)")
    args = parser.parse_args()
    print("| processes | lock | commits/s | ratio to 1 process | commit p50 (ms) | p99 (ms) | max (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for use_flock in (False, True):
            single = None
            for processes in (1, 2):
                row = run(Path(tmp), processes, args.count, args.pause_ms / 1e3, use_flock)
                single = single or row["rows_per_s"]
                print(
                    f"| {processes} | {'flock + busy_timeout' if use_flock else 'busy_timeout'} "
                    f"| {row['rows_per_s']:.0f} | {row['rows_per_s'] / single:.2f}x | {row['p50_ms']:.2f} "
                    f"| {row['p99_ms']:.2f} | {row['max_ms']:.1f} |"
                )


if __name__ == "__main__":
    main()
