"""UIDs as PS3.5 9.1 defines them, a spool that never replaces a file, and log redaction."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pacs_bridge.errors import RejectedInstance
from pacs_bridge.logsafe import RedactingFilter, redact
from pacs_bridge.store.spool import Spool, valid_uid


@pytest.mark.parametrize("uid", ["0", "1.2.3", "1.0.3", "1.2.840.10008.5.1.4.1.1.1", "9" * 64])
def test_valid_uids(uid: str) -> None:
    assert valid_uid(uid)


@pytest.mark.parametrize("uid", [".", "..", "...", "1.", ".1", "1..2", "1.02", "01.2", "1.2.3 ", "1.2\x00", "9" * 65])
def test_uids_that_are_not_uids_never_become_a_path(tmp_path: Path, uid: str) -> None:
    assert not valid_uid(uid)
    with pytest.raises(RejectedInstance):
        Spool(tmp_path).path_for(uid, "1.2.3")


def test_store_never_replaces_an_existing_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    first = spool.store("1.2.3", "1.2.3.4", (b"first",))
    second = spool.store("1.2.3", "1.2.3.4", (b"second copy",))
    assert first.created and not second.created
    assert first.path.read_bytes() == b"first"
    assert list(spool.tmp.iterdir()) == []
    assert oct(first.path.stat().st_mode & 0o777) == oct(0o600)
    assert oct(first.path.parent.stat().st_mode & 0o777) == oct(0o700)


def test_redaction_keeps_structure_and_drops_values() -> None:
    text = "Invalid value for VR PN: b'Doe^John' and 'Smith^Jane'; tag (0010,0010)"
    assert redact(text) == "Invalid value for VR PN: '<redacted>' and '<redacted>'; tag (0010,0010)"


def test_filter_redacts_pydicom_records_and_tracebacks_at_info() -> None:
    record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1, "bad value %r", ("Doe^John",), None)
    assert RedactingFilter().filter(record)
    assert "Doe^John" not in record.getMessage()
    name = "^".join(("Doe", "John"))  # not in the source line that the traceback shows
    try:
        raise ValueError(f"value {name!r} cannot be read")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    RedactingFilter().filter(record)
    assert record.exc_text is not None and "Doe^John" not in record.exc_text and "ValueError" in record.exc_text
    debug = logging.LogRecord("pydicom", logging.DEBUG, __file__, 1, "bad value %r", ("Doe^John",), None)
    RedactingFilter().filter(debug)
    assert "Doe^John" in debug.getMessage()
