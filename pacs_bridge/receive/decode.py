"""Received bytes into a pydicom Dataset, within bounds.

Deflated Explicit VR Little Endian (PS3.5 A.5) is the one transfer syntax
whose data set is compressed as a whole: pydicom and pynetdicom inflate it in
one ``zlib.decompress`` call with no limit, so 1.5 MB that inflate to 1.5 GB
(a "deflate bomb") would cost gigabytes of memory before any check could
run. Here inflation stops at ``[dicom] max_instance_mb``: an instance that
inflates past it is refused like one that arrives larger. Other transfer
syntaxes are read by pydicom as usual (the encoded size was bounded while the
bytes arrived).
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from pacs_bridge.errors import RejectedInstance

__all__ = [
    "InflatesTooLarge",
    "NotDicom",
    "dataset_from_c_store",
    "dataset_from_part10",
    "dataset_from_received_file",
    "inflate_bounded",
]

_DEFER_BYTES = 64 * 1024


class InflatesTooLarge(RejectedInstance):
    """A deflated data set that inflates past the instance size limit."""


class NotDicom(RejectedInstance):
    """Bytes that are not a DICOM Part 10 file."""


def inflate_bounded(raw: bytes, limit: int) -> bytes:
    """Inflate a raw deflate stream (no zlib header, PS3.5 A.5); raise :class:`InflatesTooLarge` past ``limit``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(raw, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise InflatesTooLarge(f"deflated data set inflates past {limit} bytes ([dicom] max_instance_mb)")
    return out


def dataset_from_c_store(encoded: bytes, transfer_syntax: str, limit: int) -> Dataset:
    """The data set of a C-STORE request (``encoded``: the data set as received, no file meta)."""
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        return decode(io.BytesIO(inflate_bounded(encoded, limit)), False, True, False)
    return decode(io.BytesIO(encoded), ts.is_implicit_VR, ts.is_little_endian, False)


def dataset_from_received_file(path: Path, transfer_syntax: str, limit: int, data_offset: int | None = None) -> Dataset:
    """The data set of a C-STORE request written to ``path`` as a PS3.10 file while it arrived.

    Values longer than 64 KiB (the pixel data) stay on disk: the data set
    holds their length, which is all the checks need. A deflated data set is
    inflated within ``limit`` like any other. ``data_offset``: where the data
    set begins, when the receiver wrote the File Meta Information itself (it
    is then not read back; the data set is read in ``transfer_syntax``).
    """
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        return dataset_from_part10(path.read_bytes(), limit)
    if data_offset is None:
        return dcmread(path, defer_size=_DEFER_BYTES, force=False)
    with open(path, "rb") as handle:
        handle.seek(data_offset)
        return read_dataset(handle, ts.is_implicit_VR, ts.is_little_endian, defer_size=_DEFER_BYTES)


def dataset_from_part10(data: bytes, limit: int) -> Dataset:
    """A PS3.10 file's data set with its File Meta Information; raises :class:`NotDicom` without a preamble."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
    except InvalidDicomError:
        raise NotDicom("not a DICOM file (no DICM preamble)") from None
    meta = _read_file_meta_info(fp)
    ts = meta.get("TransferSyntaxUID")
    if ts is None or not UID(ts).is_deflated:
        return dcmread(io.BytesIO(data), force=False)
    ds = read_dataset(io.BytesIO(inflate_bounded(fp.read(), limit)), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = meta
    return ds
