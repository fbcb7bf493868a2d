"""The few attributes the index keeps, read from a received data set (PS3.5 6.2, 7.1).

A received data set is parsed into pydicom's raw elements; converting each
of the twenty-odd values the index keeps through pydicom's value hooks cost
about as much again as parsing the whole data set. Nearly every instance
holds these values in their plain form: one value, ASCII bytes (the default
character repertoire, PS3.5 6.1.2.1, which every Specific Character Set
keeps for bytes below 0x80 without escape sequences), in the VR the data
dictionary gives (PS3.6). Those are decoded here from the raw bytes. Any
other form (a byte of 0x80 or more or an ISO 2022 escape, several values, a
null byte, another VR, a value left on disk) is converted by pydicom, as all
of them were before, so both ways give the same text
(``tests/unit/test_receive_attributes.py`` holds them side by side).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs_bridge.errors import RejectedInstance

__all__ = ["check_pixel_data", "describe", "text", "uid_text", "whole_number"]


class _Converted:
    """Marks a value that pydicom must convert (it is not in the plain form)."""


_CONVERT = _Converted()
_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
)


def _spec(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - the keywords above are all in the data dictionary
        raise KeyError(keyword)
    return int(tag), dictionary_VR(tag)


_SPECS: dict[str, tuple[int, str]] = {keyword: _spec(keyword) for keyword in _KEYWORDS}


class _Plain(NamedTuple):
    value: bytes
    little_endian: bool


def _plain(ds: Dataset, keyword: str) -> _Plain | _Converted | None:
    """The raw value of ``keyword`` when it is in the plain form, None when absent, else ``_CONVERT``."""
    tag, vr = _SPECS[keyword]
    element = ds.get_item(tag, keep_deferred=True)
    if element is None:
        return None
    if not isinstance(element, RawDataElement) or element.VR not in (None, vr):
        return _CONVERT
    value = element.value
    if value is None or not isinstance(value, bytes):
        return _CONVERT
    if vr != "US" and (not value.isascii() or b"\\" in value or b"\x1b" in value or b"\x00" in value.rstrip(b"\x00")):
        return _CONVERT
    return _Plain(value, bool(element.is_little_endian))


def text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    """The value of a text attribute, stripped and cut to ``limit`` characters; None if absent or empty."""
    plain = _plain(ds, keyword)
    if plain is None:
        return None
    # Trailing nulls are stripped by pydicom from some VRs only: it decides.
    if isinstance(plain, _Plain) and b"\x00" not in plain.value:
        return plain.value.decode("ascii").strip()[:limit] or None
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None


def uid_text(ds: Dataset, keyword: str) -> str:
    """A UID attribute's value without its padding (PS3.5 9.1); "" if absent or empty."""
    plain = _plain(ds, keyword)
    if plain is None:
        return ""
    if isinstance(plain, _Plain):
        return plain.value.decode("ascii").strip("\x00 ")
    value = ds.get(keyword)
    return str(value).strip("\x00 ") if value is not None else ""


def _number(ds: Dataset, keyword: str) -> int | None:
    """An IS or US attribute's value as an int, None if absent or empty; raises if it is not a whole number."""
    plain = _plain(ds, keyword)
    if plain is None:
        return None
    if isinstance(plain, _Plain):
        value = plain.value
        if _SPECS[keyword][1] == "US":
            if len(value) == 2:
                return int.from_bytes(value, "little" if plain.little_endian else "big")
        else:
            digits = value.strip(b" ")
            if not digits:
                return None
            if (digits[1:] if digits[:1] in (b"+", b"-") else digits).isdigit():
                return int(digits)
    converted = ds.get(keyword)
    return int(converted) if converted not in (None, "") else None


def whole_number(ds: Dataset, keyword: str) -> int | None:
    """The value of an IS or US attribute as an int; None if absent, empty or not a whole number."""
    try:
        return _number(ds, keyword)
    except (TypeError, ValueError, OverflowError):
        return None


def describe(ds: Dataset) -> dict[str, Any]:
    """Every attribute the index keeps besides the UIDs; raises if one cannot be read (unknown VR, bad value)."""
    return {
        "modality": text(ds, "Modality", 16),
        "body_part_examined": text(ds, "BodyPartExamined", 64),
        "patient_id": text(ds, "PatientID", 64),
        "patient_name": text(ds, "PatientName", 324),
        "accession_number": text(ds, "AccessionNumber", 16),
        "study_date": text(ds, "StudyDate", 8),
        "study_description": text(ds, "StudyDescription", 64),
        "series_number": whole_number(ds, "SeriesNumber"),
        "series_description": text(ds, "SeriesDescription", 64),
        "instance_number": whole_number(ds, "InstanceNumber"),
    }


def check_pixel_data(ds: Dataset, transfer_syntax: str) -> None:
    """Refuse native Pixel Data shorter than Rows x Columns x Samples x Frames x Bits Allocated (PS3.5 8.1.1).

    Encapsulated (compressed) pixel data is left to the decoder. Raises
    :class:`RejectedInstance` for truncated data; an unreadable Pixel Data
    element raises whatever pydicom raises.
    """
    if "PixelData" not in ds or UID(transfer_syntax).is_compressed:
        return
    try:
        rows, columns, bits = (_number(ds, k) for k in ("Rows", "Columns", "BitsAllocated"))
        samples = _number(ds, "SamplesPerPixel") if "SamplesPerPixel" in ds else 1
        frames = _number(ds, "NumberOfFrames") or 1
    except (TypeError, ValueError, OverflowError):
        return  # no usable geometry: nothing to compare with; analysis will refuse the image if it must
    if rows is None or columns is None or bits is None or samples is None:
        return
    expected = (rows * columns * samples * max(frames, 1) * bits + 7) // 8
    # A value left on disk while reading (``defer_size``) has its length but no value yet: it stays on disk.
    element: Any = ds.get_item("PixelData", keep_deferred=True)
    value = getattr(element, "value", None)
    actual = int(element.length) if value is None else len(value)
    if actual < expected:
        raise RejectedInstance(f"pixel data truncated: {actual} of {expected} bytes")
