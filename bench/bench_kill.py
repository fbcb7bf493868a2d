"""kill -9 of ``pacs-bridge serve`` at random moments while it works: ``python bench/bench_kill.py``.

A pynetdicom client stores 500 small DX instances in 10 studies (a short
random pause between studies, as a modality's studies arrive) while a
killer sends SIGKILL to the serve process 20 times at random moments
(a seeded delay of 0.3 to 4 s after each restart), so the kills land while
instances are being written and while studies are being settled, analysed
(the tiny test model from tests/support/tiny_model.py, so that analysis
takes milliseconds and the kills fall across every stage), published and
delivered to a real Orthanc. After each kill the same serve is started
again on the same data folder and port; the client, as a PACS does,
reconnects and resends every instance it had no success status for.

When the last kill is done and serve has finished, the bench checks:

* every acknowledged instance has its row and its spool file, and the file
  holds the SOP Instance UID and the pixel bytes that were sent;
* every study is ``done``, every deliver job ``done`` (none dead or pending);
* Orthanc holds each result object exactly once, and nothing else: its SOP
  Instance UIDs per study equal the output objects recorded for the study,
  and each study has exactly one current (not superseded) object per kind;
* 0 crashes: every restart reached "pacs-bridge ready" and answered a
  C-ECHO, serve never exited except by the bench's SIGKILL, and the final
  SIGTERM ended it with status 0;
* no partial file left in the spool's tmp/ folder, no patient identifier in
  the log.

For each kill it records what was under way: whether an association was
storing, and which jobs were leased (``running``) in the database at that
moment. Prints one JSON object; exit status 1 if any check failed.
Figures: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]  # noqa: E402

from pacs_bridge.store.layout import resolve_stored  # noqa: E402
from tests.support.dicom_files import make_radiograph  # noqa: E402
from tests.support.fuzz import echo  # noqa: E402
from tests.support.orthanc import OrthancServer, orthanc_available  # noqa: E402
from tests.support.serve import ServeProcess, free_port  # noqa: E402
from tests.support.tiny_model import build_tiny_model  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "fracatlas" / "images"
PATIENT_NAME = "Killbench^Secret"
PATIENT_ID = "KB-SECRET-4711"


def radiographs() -> list[npt.NDArray[np.float64]]:
    """The FracAtlas fixture radiographs, 192 px on the short side, scaled to [0, 1]."""
    pictures = []
    for path in sorted(FIXTURES.glob("*/*.jpg")):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise FileNotFoundError(f"cannot read {path}")
        scale = 192 / min(image.shape)
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        pictures.append(cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0)
    return pictures


class Sender:
    """A modality that stores its studies and resends whatever had no success status."""

    def __init__(self, port: int, studies: list[list[Dataset]], rng: random.Random) -> None:
        self.port = port
        self.studies = studies
        self.rng = rng
        self.acknowledged: dict[str, Dataset] = {}
        self.stores = 0
        self.failed_stores = 0
        self.unanswered = 0
        self.associations = 0
        self.refused = 0
        self.storing = threading.Event()
        self.done = threading.Event()

    def _associate(self) -> Any:
        ae = AE(ae_title="KILL_SCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        return ae.associate("127.0.0.1", self.port, ae_title="PACS_BRIDGE", max_pdu=65536)

    def _send_study(self, datasets: list[Dataset]) -> None:
        while True:
            pending = [ds for ds in datasets if ds.SOPInstanceUID not in self.acknowledged]
            if not pending:
                return
            assoc = self._associate()
            if not assoc.is_established:
                self.refused += 1
                time.sleep(0.3)  # serve is restarting
                continue
            self.associations += 1
            self.storing.set()
            try:
                for ds in pending:
                    if not assoc.is_established:
                        break
                    try:
                        status = assoc.send_c_store(ds)
                    except (RuntimeError, OSError):
                        break
                    self.stores += 1
                    if not status:
                        # No answer: the peer is gone (pynetdicom may still call the association
                        # established, and a release would wait for its timeout). Start again.
                        self.unanswered += 1
                        break
                    if int(status.Status) == 0:
                        self.acknowledged[str(ds.SOPInstanceUID)] = ds
                    else:
                        self.failed_stores += 1
                else:
                    if assoc.is_established:
                        assoc.release()
                    continue
                assoc.abort()
            finally:
                self.storing.clear()

    def run(self) -> None:
        """Send every study, one association at a time, with a pause between studies."""
        try:
            for datasets in self.studies:
                self._send_study(datasets)
                time.sleep(self.rng.uniform(0.0, 3.0))
        finally:
            self.done.set()


def running_jobs(db_path: Path) -> dict[str, int]:
    """Jobs leased at this moment (``running``), by kind."""
    with sqlite3.connect(db_path, timeout=30) as conn:
        return dict(conn.execute("select kind, count(*) from jobs where state = 'running' group by kind").fetchall())


def progress(text: str) -> None:
    """One line of progress on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_until_finished(server: ServeProcess, studies: int, timeout: float) -> tuple[bool, float]:
    """Wait until every study is done and no job is left to do; (finished, seconds waited)."""
    started = time.monotonic()
    db_path = server.data_dir / "pacs-bridge.db"
    last = ""
    while time.monotonic() - started < timeout:
        with sqlite3.connect(db_path, timeout=30) as conn:
            states = Counter(s for (s,) in conn.execute("select state from studies"))
            jobs = conn.execute(
                "select kind, state, count(*) from jobs where state in ('pending', 'running') group by kind, state"
            ).fetchall()
        if states.get("done", 0) == studies and not jobs:
            return True, time.monotonic() - started
        now = f"studies {dict(states)}, open jobs {jobs}"
        if now != last:
            progress(now)
            last = now
        time.sleep(1.0)
    return False, time.monotonic() - started


def check_instances(data_dir: Path, acknowledged: dict[str, Dataset]) -> dict[str, int]:
    """Acknowledged instances without a row, without a file, or with a file that differs."""
    with sqlite3.connect(data_dir / "pacs-bridge.db") as conn:
        rows = {
            uid: resolve_stored(data_dir, p)
            for uid, p in conn.execute("select sop_instance_uid, file_path from instances")
        }
    no_row = no_file = differs = 0
    for uid, sent in acknowledged.items():
        path = rows.get(uid)
        if path is None:
            no_row += 1
        elif not Path(path).is_file():
            no_file += 1
        else:
            kept = dcmread(path)
            if kept.SOPInstanceUID != uid or kept.PixelData != sent.PixelData:
                differs += 1
    return {"no_row": no_row, "no_file": no_file, "file_differs": differs, "rows": len(rows)}


def check_outputs(data_dir: Path, pacs: OrthancServer, study_uids: list[str]) -> dict[str, Any]:
    """Compare the output objects recorded per study with what Orthanc holds."""
    with sqlite3.connect(data_dir / "pacs-bridge.db") as conn:
        outputs = conn.execute(
            "select s.study_instance_uid, o.sop_instance_uid, o.kind, o.superseded "
            "from output_objects o join studies s on s.id = o.study_id"
        ).fetchall()
        deliver = dict(
            conn.execute("select state, count(*) from jobs where kind = 'deliver' group by state").fetchall()
        )
        analysed = dict(
            conn.execute(
                "select s.study_instance_uid, count(*) from instances i join studies s on s.id = i.study_id "
                "where i.state = 'analysed' group by s.study_instance_uid"
            ).fetchall()
        )
    recorded: dict[str, set[str]] = {uid: set() for uid in study_uids}
    current: Counter[tuple[str, str]] = Counter()
    superseded = 0
    for study_uid, sop_uid, kind, old in outputs:
        recorded.setdefault(study_uid, set()).add(sop_uid)
        if old:
            superseded += 1
        else:
            current[(study_uid, kind)] += 1
    # One SR and one summary per study, one capture and one GSPS per analysed instance: anything
    # more is a result made twice under a new UID.
    wrong_counts = []
    for study_uid in study_uids:
        n = analysed.get(study_uid, 0)
        for kind, expected in (("sr", 1), ("summary", 1), ("capture", n), ("gsps", n)):
            if current[(study_uid, kind)] != expected:
                wrong_counts.append(f"{study_uid} {kind}: {current[(study_uid, kind)]} (expected {expected})")
    in_pacs_total = duplicates = missing = unexpected = 0
    for study_uid in study_uids:
        held = Counter(item["MainDicomTags"]["SOPInstanceUID"] for item in pacs.instances_of_study(study_uid))
        in_pacs_total += sum(held.values())
        duplicates += sum(n - 1 for n in held.values() if n > 1)
        missing += len(recorded[study_uid] - set(held))
        unexpected += len(set(held) - recorded[study_uid])
    kinds: Counter[str] = Counter()
    for (_, kind), n in current.items():
        kinds[kind] += n
    return {
        "output_objects": len(outputs),
        "superseded_revisions": superseded,
        "current_objects_per_kind": dict(kinds),
        "unexpected_object_counts": wrong_counts,
        "deliver_jobs": deliver,
        "in_orthanc": in_pacs_total,
        "duplicates_in_orthanc": duplicates,
        "recorded_but_not_in_orthanc": missing,
        "in_orthanc_but_not_recorded": unexpected,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--instances", type=int, default=50, help="per study")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--min-delay", type=float, default=0.3, help="seconds after a restart before the next kill")
    parser.add_argument("--max-delay", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--finish-timeout", type=float, default=900.0, help="seconds to finish after the last kill")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (logs, database)")
    args = parser.parse_args()
    if not orthanc_available():
        print("Orthanc is not installed (/usr/sbin/Orthanc)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    noise = np.random.default_rng(args.seed)
    pictures = radiographs()
    with tempfile.TemporaryDirectory(prefix="pb-kill-") as tmp_name:
        tmp = Path(tmp_name) if args.keep is None else args.keep
        tmp.mkdir(parents=True, exist_ok=True)
        model_dir = build_tiny_model(tmp / "model")
        pacs = OrthancServer(tmp, {"bridge": ("PACS_BRIDGE", "127.0.0.1", free_port())}).start()
        config: dict[str, Any] = {
            "analysis": {"enabled": True, "model_dir": str(model_dir), "intra_op_threads": 1},
            "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}],
            "send": {"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
            # Longer than a restart, so that a study interrupted by a kill settles once, complete.
            "study": {"settle_seconds": 8},
            "queue": {"lease_seconds": 3, "poll_seconds": 0.2},
        }
        port = free_port()
        server = ServeProcess(tmp / "bridge", config, port=port)
        studies: list[list[Dataset]] = []
        for s in range(args.studies):
            study_uid, series_uid = generate_uid(), generate_uid()
            datasets = []
            for n in range(args.instances):
                picture = pictures[(s * args.instances + n) % len(pictures)]
                datasets.append(
                    make_radiograph(
                        picture + noise.normal(0.0, 0.01, picture.shape),  # every instance's pixels differ
                        study_uid,
                        series_uid=series_uid,
                        instance_number=n + 1,
                        patient_name=PATIENT_NAME,
                        patient_id=PATIENT_ID,
                    )
                )
            studies.append(datasets)
        study_uids = [str(s[0].StudyInstanceUID) for s in studies]
        kills: list[dict[str, Any]] = []
        crashes: list[str] = []
        restart_seconds: list[float] = []
        echo_failures = 0
        started = time.monotonic()
        try:
            server.start()
            assert server.proc is not None
            sender = Sender(port, studies, rng)
            thread = threading.Thread(target=sender.run, daemon=True)
            thread.start()
            for n in range(args.kills):
                time.sleep(rng.uniform(args.min_delay, args.max_delay))
                if server.proc.poll() is not None:
                    crashes.append(f"serve exited by itself with {server.proc.returncode} before kill {n + 1}")
                storing = sender.storing.is_set()
                server.kill9()
                progress(f"kill {n + 1}: storing={storing}, acknowledged={len(sender.acknowledged)}")
                kills.append(
                    {
                        "at_s": round(time.monotonic() - started, 1),
                        "association_storing": storing,
                        "acknowledged_so_far": len(sender.acknowledged),
                        "jobs_running": running_jobs(server.data_dir / "pacs-bridge.db"),
                    }
                )
                t0 = time.monotonic()
                try:
                    server.start(timeout=120)
                except (RuntimeError, TimeoutError) as exc:
                    crashes.append(f"restart {n + 1} failed: {str(exc)[-500:]}")
                    server.start(timeout=120)
                restart_seconds.append(time.monotonic() - t0)
                if not echo(port):
                    echo_failures += 1
            thread.join(timeout=600)
            progress(f"last kill done; sender finished={sender.done.is_set()}, acknowledged={len(sender.acknowledged)}")
            finished, finish_seconds = wait_until_finished(server, args.studies, args.finish_timeout)
            if server.proc.poll() is not None:
                crashes.append(f"serve exited by itself with {server.proc.returncode} after the last kill")
            final_echo = echo(port)
            instances = check_instances(server.data_dir, sender.acknowledged)
            outputs = check_outputs(server.data_dir, pacs, study_uids)
            with sqlite3.connect(server.data_dir / "pacs-bridge.db") as conn:
                study_states = dict(conn.execute("select state, count(*) from studies group by state").fetchall())
                analysed = conn.execute("select count(*) from instance_results where ok = 1").fetchone()[0]
            leftovers = len(list((server.data_dir / "tmp").iterdir())) if (server.data_dir / "tmp").exists() else 0
        finally:
            stop_code = server.stop()
            pacs.stop()
        log = server.log()
    stages_hit: Counter[str] = Counter()
    for kill in kills:
        if kill["association_storing"]:
            stages_hit["receive"] += 1
        for kind in kill["jobs_running"]:
            stages_hit[kind] += 1
    result = {
        "seed": args.seed,
        "model": "tiny test model (tests/support/tiny_model.py, 64 px)",
        "studies": args.studies,
        "instances": args.studies * args.instances,
        "kills": len(kills),
        "kills_that_hit_each_stage": dict(stages_hit),
        "kills_detail": kills,
        "restart_seconds_max": round(max(restart_seconds, default=0.0), 1),
        "restart_seconds_mean": round(sum(restart_seconds) / max(1, len(restart_seconds)), 1),
        "echo_after_restart_failures": echo_failures,
        "final_echo": final_echo,
        "sender": {
            "associations": sender.associations,
            "associations_refused_while_restarting": sender.refused,
            "c_stores": sender.stores,
            "c_stores_unanswered_serve_killed": sender.unanswered,
            "c_stores_with_a_failure_status": sender.failed_stores,
            "acknowledged": len(sender.acknowledged),
        },
        "acknowledged_lost": instances,
        "study_states": study_states,
        "instances_analysed": analysed,
        "finished_after_last_kill_s": round(finish_seconds, 1),
        "finished": finished,
        "outputs": outputs,
        "tmp_leftovers": leftovers,
        "crashes": crashes,
        "final_sigterm_exit_status": stop_code,
        "log_tracebacks": log.count("Traceback"),
        "log_patient_identifiers": log.count(PATIENT_NAME) + log.count(PATIENT_ID) + log.count("Killbench"),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result, indent=2))
    ok = (
        finished
        and not crashes
        and stop_code == 0
        and echo_failures == 0
        and final_echo
        and len(sender.acknowledged) == args.studies * args.instances
        and instances["no_row"] + instances["no_file"] + instances["file_differs"] == 0
        and study_states == {"done": args.studies}
        and outputs["duplicates_in_orthanc"] == 0
        and outputs["recorded_but_not_in_orthanc"] == 0
        and outputs["in_orthanc_but_not_recorded"] == 0
        and not outputs["unexpected_object_counts"]
        and set(outputs["deliver_jobs"]) == {"done"}
        and leftovers == 0
        and result["log_patient_identifiers"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    raise SystemExit(main())
