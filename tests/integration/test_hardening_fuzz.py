"""A seeded fuzz run: mutated instances over C-STORE and through the folder, nothing acknowledged lost.

The long version is ``python bench/bench_fuzz.py --inputs 10000``; the
figures are in docs/reliability.md.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pacs_bridge.store.layout import resolve_stored
from tests.support.fuzz import echo, fuzz_cstore, fuzz_folder, verify_acknowledged
from tests.support.mutate import SECRET_ID, SECRET_NAME, Mutator
from tests.support.serve import ServeProcess

SEED = 20261122


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom, writing the structured mutants
def test_seeded_fuzz_over_c_store_and_the_folder_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with ServeProcess(tmp_path / "srv", {"watch": {"stable_seconds": 0.2}}) as server:
        assert server.proc is not None
        mutator = Mutator(SEED)
        report = fuzz_cstore(server, mutator, 250, tmp_path / "work", echo_every=25)
        assert report.echo_failures == 0 and report.echoes == 10
        assert report.statuses[0] > 20, report.summary()  # unchanged and harmless mutants are stored
        assert sum(n for status, n in report.statuses.items() if status != 0) > 50, report.summary()
        assert report.unreadable_acknowledged == 0
        assert verify_acknowledged(server, report.acknowledged) == []
        folder = fuzz_folder(server, mutator, 80)
        assert not any(p.name.startswith("fuzz-") for p in server.inbox.iterdir()), "inbox files left unhandled"
        assert folder.folder_ingested + folder.folder_failed == 80, folder.summary()
        assert echo(server.port)
        assert server.proc.poll() is None, "serve died"
        data = server.data_dir
        with sqlite3.connect(data / "pacs-bridge.db") as conn:
            indexed = {resolve_stored(data, p) for (p,) in conn.execute("select file_path from instances")}
        assert indexed == set(data.glob("spool/*/*.dcm")), "spool files and rows differ"
        assert not list((data / "tmp").iterdir())
    log = server.log()
    assert SECRET_NAME not in log and SECRET_ID not in log and "Geheimnis" not in log
    assert "Traceback" not in log
