"""The attributes the index keeps: the plain-value route gives what pydicom's conversion gives.

``pacs_bridge/receive/attributes.py`` decodes plain ASCII values from the raw
elements and leaves every other form to pydicom. Here each of its readers is
held against the pydicom route it replaced (``ds.get`` and ``str``/``int``),
on crafted values (character sets, several values, padding, other VRs, both
byte orders, implicit VR) and on a few hundred mutated files from pydicom's
own test data: same value, or an error on both routes.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any

import pytest
from pydicom import config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from pacs_bridge.errors import RejectedInstance
from pacs_bridge.receive.attributes import check_pixel_data, describe, uid_text
from pacs_bridge.receive.decode import dataset_from_part10
from tests.support.mutate import Mutator, meta_end

UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


# The pydicom route, as the ingest path read these attributes before.
def _reference_text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None


def _reference_int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None


def _reference_describe(ds: Dataset) -> dict[str, Any]:
    return {
        "modality": _reference_text(ds, "Modality", 16),
        "body_part_examined": _reference_text(ds, "BodyPartExamined", 64),
        "patient_id": _reference_text(ds, "PatientID", 64),
        "patient_name": _reference_text(ds, "PatientName", 324),
        "accession_number": _reference_text(ds, "AccessionNumber", 16),
        "study_date": _reference_text(ds, "StudyDate", 8),
        "study_description": _reference_text(ds, "StudyDescription", 64),
        "series_number": _reference_int(ds, "SeriesNumber"),
        "series_description": _reference_text(ds, "SeriesDescription", 64),
        "instance_number": _reference_int(ds, "InstanceNumber"),
    }


def _reference_uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip("\x00 ") if value is not None else ""


def _reference_pixel_check(ds: Dataset, transfer_syntax: str) -> None:
    if "PixelData" not in ds or UID(transfer_syntax).is_compressed:
        return
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = (
            int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * max(frames, 1) * int(ds.BitsAllocated)
        )
    except (AttributeError, TypeError, ValueError, OverflowError, KeyError):
        return
    expected = (bits + 7) // 8
    element: Any = ds.get_item("PixelData", keep_deferred=True)
    value = getattr(element, "value", None)
    actual = int(element.length) if value is None else len(value)
    if actual < expected:
        raise RejectedInstance(f"pixel data truncated: {actual} of {expected} bytes")


def _outcome(read: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "value", read()
    except RejectedInstance as exc:
        return "refused", str(exc)
    except Exception:  # a malformed element: the ingest path refuses it either way
        return "error", None


def _routes(parse: Callable[[], Dataset], transfer_syntax: str) -> tuple[list[Any], list[Any]]:
    ours, theirs = parse(), parse()
    mine = [_outcome(lambda k=k: uid_text(ours, k)) for k in UID_KEYWORDS]
    mine += [_outcome(lambda: describe(ours)), _outcome(lambda: check_pixel_data(ours, transfer_syntax))]
    ref = [_outcome(lambda k=k: _reference_uid(theirs, k)) for k in UID_KEYWORDS]
    ref += [
        _outcome(lambda: _reference_describe(theirs)),
        _outcome(lambda: _reference_pixel_check(theirs, transfer_syntax)),
    ]
    return mine, ref


def _encoded(ds: Dataset, transfer_syntax: str) -> bytes:
    ts = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_little_endian = ts.is_little_endian
    fp.is_implicit_VR = ts.is_implicit_VR
    write_dataset(fp, ds)
    data = fp.getvalue()
    if ts.is_implicit_VR:
        return data
    # Elements given as raw bytes were written as UN (12-byte header): give them the VR asked for.
    order = "<" if ts.is_little_endian else ">"
    for tag, vr in getattr(ds, "_raw_vrs", {}).items():
        head = struct.pack(f"{order}HH", tag >> 16, tag & 0xFFFF) + b"UN\x00\x00"
        at = data.index(head)
        (length,) = struct.unpack(f"{order}I", data[at + 8 : at + 12])
        if vr in ("UN", "UT", "OB"):
            continue
        data = data[:at] + head[:4] + vr.encode() + struct.pack(f"{order}H", length) + data[at + 12 :]
    return data


def _parser(data: bytes, transfer_syntax: str) -> Callable[[], Dataset]:
    ts = UID(transfer_syntax)
    return lambda: read_dataset(io.BytesIO(data), ts.is_implicit_VR, ts.is_little_endian, defer_size=64 * 1024)


def _base() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P-123"
    ds.AccessionNumber = "A42"
    ds.StudyDate = "20261203"
    ds.StudyDescription = "XR WRIST 2 VIEWS"
    ds.SeriesDescription = "PA"
    ds.BodyPartExamined = "HAND"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 7
    ds.Rows = 4
    ds.Columns = 6
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 48
    return ds


def _raw_value(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put ``value`` as the element's encoded bytes (even length) with ``vr``, bypassing pydicom's checks."""
    tag = int(tag_for_keyword(keyword) or 0)
    saved, config.replace_un_with_known_vr = config.replace_un_with_known_vr, False
    try:
        ds.add_new(tag, "UN", value + (b" " if len(value) % 2 else b""))
    finally:
        config.replace_un_with_known_vr = saved
    raw_vrs = getattr(ds, "_raw_vrs", {})
    raw_vrs[tag] = vr
    object.__setattr__(ds, "_raw_vrs", raw_vrs)


CRAFTED: list[tuple[str, Callable[[Dataset], None]]] = [
    ("plain", lambda ds: None),
    (
        "latin-1 name",
        lambda ds: (setattr(ds, "SpecificCharacterSet", "ISO_IR 100"), setattr(ds, "PatientName", "Müller^Jürgen")),
    ),
    (
        "utf-8 name",
        lambda ds: (setattr(ds, "SpecificCharacterSet", "ISO_IR 192"), setattr(ds, "PatientName", "山田^太郎")),
    ),
    (
        "iso 2022 name",
        lambda ds: (
            setattr(ds, "SpecificCharacterSet", ["", "ISO 2022 IR 87"]),
            _raw_value(ds, "PatientName", "PN", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"),
        ),
    ),
    ("several modalities", lambda ds: setattr(ds, "Modality", ["DX", "CR"])),
    ("name groups", lambda ds: setattr(ds, "PatientName", "Doe^Jane=Doe^Jane=")),
    ("padded uid", lambda ds: _raw_value(ds, "StudyInstanceUID", "UI", b"1.2.3.4\x00")),
    ("uid with spaces", lambda ds: _raw_value(ds, "SOPInstanceUID", "UI", b" 1.2.3.45 ")),
    ("empty uid", lambda ds: _raw_value(ds, "SeriesInstanceUID", "UI", b"")),
    ("two uids", lambda ds: _raw_value(ds, "SOPClassUID", "UI", b"1.2.3\\1.2.4")),
    ("trailing null text", lambda ds: _raw_value(ds, "StudyDescription", "LO", b"KNEE\x00")),
    ("embedded null text", lambda ds: _raw_value(ds, "PatientID", "LO", b"P\x001")),
    ("leading spaces", lambda ds: _raw_value(ds, "AccessionNumber", "SH", b"  A7  ")),
    ("control characters", lambda ds: _raw_value(ds, "SeriesDescription", "LO", b"\tPA\x1c")),
    ("long description", lambda ds: setattr(ds, "StudyDescription", "X" * 200)),
    ("empty text", lambda ds: _raw_value(ds, "Modality", "CS", b"")),
    ("odd date", lambda ds: _raw_value(ds, "StudyDate", "DA", b"2026-12-03")),
    ("signed number", lambda ds: _raw_value(ds, "SeriesNumber", "IS", b" +12")),
    ("negative number", lambda ds: _raw_value(ds, "InstanceNumber", "IS", b"-3")),
    ("decimal number", lambda ds: _raw_value(ds, "InstanceNumber", "IS", b"12.0")),
    ("not a number", lambda ds: _raw_value(ds, "SeriesNumber", "IS", b"abc")),
    ("underscore number", lambda ds: _raw_value(ds, "SeriesNumber", "IS", b"1_0")),
    ("two numbers", lambda ds: _raw_value(ds, "InstanceNumber", "IS", b"1\\2")),
    ("empty number", lambda ds: _raw_value(ds, "SeriesNumber", "IS", b"")),
    ("number as UN", lambda ds: _raw_value(ds, "SeriesNumber", "UN", b"12")),
    ("name as UN", lambda ds: _raw_value(ds, "PatientName", "UN", b"Doe^John")),
    ("rows as UN", lambda ds: _raw_value(ds, "Rows", "UN", b"\x04\x00")),
    ("rows as UL", lambda ds: _raw_value(ds, "Rows", "UL", b"\x04\x00\x00\x00")),
    ("two rows values", lambda ds: _raw_value(ds, "Rows", "US", b"\x04\x00\x04\x00")),
    ("truncated pixel data", lambda ds: setattr(ds, "PixelData", b"\x00" * 46)),
    ("frames", lambda ds: (setattr(ds, "NumberOfFrames", "3"), setattr(ds, "PixelData", b"\x00" * 100))),
    (
        "frames not a number",
        lambda ds: (_raw_value(ds, "NumberOfFrames", "IS", b"xx"), setattr(ds, "PixelData", b"\x00" * 10)),
    ),
    ("frames zero", lambda ds: (setattr(ds, "NumberOfFrames", "0"), setattr(ds, "PixelData", b"\x00" * 10))),
    ("no samples", lambda ds: (delattr(ds, "SamplesPerPixel"), setattr(ds, "PixelData", b"\x00" * 10))),
    ("no rows", lambda ds: (delattr(ds, "Rows"), setattr(ds, "PixelData", b"\x00" * 2))),
    ("three samples", lambda ds: (setattr(ds, "SamplesPerPixel", 3), setattr(ds, "PixelData", b"\x00" * 100))),
    ("nothing but uids", lambda ds: [delattr(ds, k) for k in list(ds.dir()) if k not in UID_KEYWORDS]),
]


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize(("label", "change"), CRAFTED, ids=[c[0] for c in CRAFTED])
def test_plain_route_matches_pydicom_on_crafted_values(
    label: str, change: Callable[[Dataset], None], transfer_syntax: str
) -> None:
    ds = _base()
    change(ds)
    if ImplicitVRLittleEndian == transfer_syntax and label in {
        "number as UN",
        "name as UN",
        "rows as UN",
        "rows as UL",
    }:
        pytest.skip("implicit VR carries no VR to differ from the data dictionary")
    mine, ref = _routes(_parser(_encoded(ds, transfer_syntax), transfer_syntax), transfer_syntax)
    assert mine == ref, label


def test_plain_route_reads_the_common_values() -> None:
    data = _encoded(_base(), ExplicitVRLittleEndian)
    ds = _parser(data, ExplicitVRLittleEndian)()
    described = describe(ds)
    assert described["patient_name"] == "Doe^Jane"
    assert described["series_number"] == 3
    assert described["instance_number"] == 7
    assert described["study_date"] == "20261203"
    assert uid_text(ds, "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.1.1"
    check_pixel_data(ds, ExplicitVRLittleEndian)
    # Read from the raw bytes: pydicom converted none of them.
    assert all(isinstance(ds.get_item(k), RawDataElement) for k in ("PatientName", "Rows", "SeriesNumber", "StudyDate"))


def test_plain_route_refuses_truncated_pixel_data() -> None:
    ds = _base()
    ds.PixelData = b"\x00" * 40
    parsed = _parser(_encoded(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)()
    with pytest.raises(RejectedInstance, match="pixel data truncated: 40 of 48 bytes"):
        check_pixel_data(parsed, ExplicitVRLittleEndian)


def test_plain_route_matches_pydicom_on_mutated_files() -> None:
    mutator = Mutator(20261203)
    compared = 0
    for n in range(300):
        mutant = mutator.mutant(generate_uid())
        ts = UID(mutant.transfer_syntax)
        if ts.is_deflated:

            def parse(data: bytes = mutant.data) -> Dataset:
                return dataset_from_part10(data, 1 << 26)

        else:
            start = meta_end(mutant.data)
            parse = _parser(mutant.data[start:], mutant.transfer_syntax)
        try:
            parse()
        except Exception:
            continue  # not parseable at all: refused before these readers run
        mine, ref = _routes(parse, mutant.transfer_syntax)
        assert mine == ref, f"mutant {n} ({mutant.seed}: {mutant.label})"
        compared += 1
    assert compared >= 150
