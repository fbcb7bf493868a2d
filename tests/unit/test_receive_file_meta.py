"""The File Meta Information the C-STORE reader writes is byte for byte what pydicom writes (PS3.10 7.1)."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid
from pynetdicom.dsutils import create_file_meta

from pacs_bridge.receive.pdata import file_preamble_and_meta

DX = "1.2.840.10008.5.1.4.1.1.1.1"
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
]


def _pydicom(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(transfer_syntax)
    )
    write_file_meta_info(out, meta)
    return out.getvalue()


@pytest.mark.parametrize("transfer_syntax", TRANSFER_SYNTAXES)
def test_same_bytes_as_pydicom_for_odd_and_even_uids(transfer_syntax: str) -> None:
    uid = generate_uid()
    for sop_instance in (uid, uid[:40], uid[:41], "1.2.3", "1.23"):
        for sop_class in (DX, "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.22"):
            ours = file_preamble_and_meta(sop_class, sop_instance, transfer_syntax)
            assert ours == _pydicom(sop_class, sop_instance, transfer_syntax)


def test_read_back_by_pydicom_and_uid_cut_at_64() -> None:
    instance = generate_uid()
    head = file_preamble_and_meta(DX, instance, "1.2.840.10008.1.2.1")
    meta = dcmread(io.BytesIO(head + b"\x08\x00\x16\x00UI\x00\x00"), force=False).file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) == (DX, instance)
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    # An over-long (invalid) UID in a request cannot overflow the 2-byte length: the store is refused later.
    long_head = file_preamble_and_meta(DX, "1." * 40_000, "1.2.840.10008.1.2.1")
    assert len(long_head) < len(head) + 64
