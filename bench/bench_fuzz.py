"""Long seeded fuzz run against a real ``pacs-bridge serve``: ``python bench/bench_fuzz.py --inputs 10000``.

The same mutator and checks as tests/integration/test_hardening_fuzz.py, at
length: mutants of pydicom's test files (every accepted transfer syntax,
compressed pixel data included) over C-STORE, a C-ECHO on a fresh
association every 100 inputs, then a tenth as many mutants through the
inbox. Prints the statuses, the echo failures, the acknowledged instances
missing from the spool or the index (must be 0), whether serve is alive and
its peak RSS. Exit status 1 if anything acknowledged was lost, an echo
failed or serve died. Figures: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.fuzz import echo, fuzz_cstore, fuzz_folder, verify_acknowledged  # noqa: E402
from tests.support.mutate import SECRET_ID, SECRET_NAME, Mutator  # noqa: E402
from tests.support.serve import ServeProcess  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--inputs", type=int, default=10_000, help="mutants over C-STORE")
    parser.add_argument("--folder-inputs", type=int, default=None, help="mutants through the inbox (default inputs/10)")
    parser.add_argument("--seed", type=int, default=20261122)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # pydicom, writing the structured mutants
    folder_inputs = args.folder_inputs if args.folder_inputs is not None else max(1, args.inputs // 10)
    with tempfile.TemporaryDirectory(prefix="pb-fuzz-") as tmp:
        server = ServeProcess(Path(tmp) / "srv", {"watch": {"stable_seconds": 0.2}})
        server.start()
        try:
            assert server.proc is not None
            mutator = Mutator(args.seed)
            report = fuzz_cstore(server, mutator, args.inputs, Path(tmp) / "work", echo_every=100)
            lost = verify_acknowledged(server, report.acknowledged)
            folder = fuzz_folder(server, mutator, folder_inputs, timeout=max(300.0, folder_inputs * 0.5))
            alive = server.proc.poll() is None and echo(server.port)
            rss = peak_rss_mib(server.proc.pid)
        finally:
            server.stop()
        log = server.log()
    result = {
        "seed": args.seed,
        "c_store": report.summary(),
        "labels": dict(report.labels.most_common()),
        "acknowledged_lost": len(lost),
        "acknowledged_unverifiable": report.unreadable_acknowledged,
        "folder": {
            "files": folder.folder_files,
            "ingested": folder.folder_ingested,
            "failed": folder.folder_failed,
            "seconds": round(folder.seconds, 1),
        },
        "serve_alive_at_end": alive,
        "serve_peak_rss_mib": round(rss, 1),
        "tracebacks_in_log": log.count("Traceback"),
        "patient_identifiers_in_log": log.count(SECRET_NAME) + log.count(SECRET_ID),
    }
    print(json.dumps(result, indent=2))
    return 0 if alive and not lost and report.echo_failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
