"""A seeded mutator of DICOM files, seeded from pydicom's own test files.

Seeds cover every transfer syntax the listener accepts that pydicom's test
data has small examples of (native little and big endian, implicit VR,
deflate, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000). Each
mutant is a Secondary Capture instance (a SOP class the listener accepts)
with fresh UIDs and the patient identity :data:`SECRET_NAME` /
:data:`SECRET_ID`, then changed in the way DCMTK's and Orthanc's fuzz targets
change their inputs: structured mutations on the data set (deep sequences,
huge values, wrong VRs, unknown VRs on identifying elements) and byte-level
mutations on the encoded data set (bit flips, interesting values, length
fields, truncation, insertions, duplicated chunks). Same seed, same mutants.
"""

from __future__ import annotations

import copy
import io
import random
import struct
from dataclasses import dataclass
from functools import cache

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

__all__ = ["SECONDARY_CAPTURE", "SECRET_ID", "SECRET_NAME", "Mutant", "Mutator", "meta_end", "seed_datasets"]

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SECRET_NAME = "Fuzzmann^Geheimnis"
SECRET_ID = "FZ-SECRET-7731"

SEED_FILES = (
    "SC_rgb_small_odd.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "MR_small_implicit.dcm",
    "image_dfl.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "JPEGLSNearLossless_08.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "MR_small_jp2klossless.dcm",
    "CT_small.dcm",
)

_INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xfe\xff\x00\xe0")


@dataclass(frozen=True)
class Mutant:
    """One mutated file: its bytes, what was done to it, and the seed it came from."""

    data: bytes
    label: str
    seed: str
    transfer_syntax: str


def meta_end(data: bytes) -> int:
    """Offset of the first data set byte of a PS3.10 file (after its File Meta Information group)."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return 132
    (group_length,) = struct.unpack("<I", data[140:144])
    return 144 + group_length


@cache
def seed_datasets() -> tuple[tuple[str, Dataset], ...]:
    """The seeds, read once."""
    out = []
    for name in SEED_FILES:
        try:
            path = get_testdata_file(name)
            if path is None:
                continue
            out.append((name, dcmread(path)))
        except Exception:
            continue
    return tuple(out)


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Mutator:
    """Produces mutants from the seeds with one ``random.Random(seed)``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seeds = seed_datasets()
        if not self.seeds:
            raise RuntimeError("no pydicom test files found (pydicom-data)")

    def _fresh(self, base: Dataset, study_uid: str) -> Dataset:
        ds = copy.deepcopy(base)
        ds.SOPClassUID = SECONDARY_CAPTURE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName = SECRET_NAME
        ds.PatientID = SECRET_ID
        ds.AccessionNumber = "FZ7731"
        ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    def _structured(self, ds: Dataset) -> str:
        rng = self.rng
        choice = rng.randrange(6)
        if choice == 0:
            depth = rng.randrange(5, 120)
            inner = Dataset()
            inner.CodeMeaning = "x"
            for _ in range(depth):
                outer = Dataset()
                outer.ContentSequence = Sequence([inner])
                inner = outer
            ds.ContentSequence = Sequence([inner])
            return f"nested sequences x{depth}"
        if choice == 1:
            size = rng.choice((65, 1024, 65_536, 1_000_000))
            ds.StudyDescription = "A" * size
            return f"StudyDescription of {size} bytes"
        if choice == 2:
            count = rng.randrange(100, 3000)
            for n in range(count):
                ds.add_new((0x0009 + 2 * (n % 50), 0x1000 + n), "LO", f"private {n}")
            return f"{count} private elements"
        if choice == 3:
            ds.Rows = rng.choice((0, 1, 65535))
            ds.Columns = rng.choice((0, 1, 65535))
            return "Rows/Columns changed"
        if choice == 4:
            ds.NumberOfFrames = rng.choice(("0", "-1", "99999"))
            return "Number of Frames changed"
        del ds.PixelData
        return "no Pixel Data"

    def _bytes(self, data: bytes, start: int) -> tuple[bytes, str]:
        rng = self.rng
        body = bytearray(data[start:])
        if not body:
            return data, "empty"
        choice = rng.randrange(7)
        if choice == 0:
            flips = rng.randrange(1, 9)
            for _ in range(flips):
                i = rng.randrange(len(body))
                body[i] ^= 1 << rng.randrange(8)
            label = f"{flips} bit flips"
        elif choice == 1:
            value = rng.choice(_INTERESTING)
            i = rng.randrange(len(body))
            body[i : i + len(value)] = value
            label = f"interesting value at {i}"
        elif choice == 2:
            i = rng.randrange(len(body))
            del body[i:]
            label = f"truncated at {i}"
        elif choice == 3:
            i = rng.randrange(len(body))
            chunk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            body[i:i] = chunk
            label = f"{len(chunk)} random bytes inserted"
        elif choice == 4:
            i = rng.randrange(len(body))
            j = min(len(body), i + rng.randrange(1, 256))
            body[i:i] = body[i:j]
            label = "chunk duplicated"
        elif choice == 5:
            # A length field: find an element header and make its length huge or odd.
            i = rng.randrange(max(1, len(body) - 8))
            body[i + 4 : i + 8] = rng.choice((b"\xff\xff\xff\xf0", b"\x01\x00\x00\x80", b"\x03\x00\x00\x00"))
            label = "length field"
        else:
            # An unknown VR on an identifying element, when the encoding is explicit.
            for tag in ((0x0010, 0x0010), (0x0008, 0x0050), (0x0010, 0x0020)):
                needle = struct.pack("<HH", *tag)
                i = body.find(needle)
                if i != -1 and bytes(body[i + 4 : i + 6]).isalpha():
                    body[i + 4 : i + 6] = rng.choice((b"ZZ", b"??", b"\x00\x00", b"OB"))
                    return data[:start] + bytes(body), f"VR of {tag[0]:04X},{tag[1]:04X} changed"
            label = "no explicit VR to change"
        return data[:start] + bytes(body), label

    def mutant(self, study_uid: str, *, meta_too: bool = False) -> Mutant:
        """One mutant of a random seed, in study ``study_uid``."""
        rng = self.rng
        name, base = self.seeds[rng.randrange(len(self.seeds))]
        ds = self._fresh(base, study_uid)
        labels = []
        try:
            if rng.random() < 0.3:
                labels.append(self._structured(ds))
            data = _encode(ds)
        except Exception as exc:  # a structured mutation pydicom cannot write: keep the plain seed
            labels.append(f"unencodable ({type(exc).__name__})")
            ds = self._fresh(base, study_uid)
            data = _encode(ds)
        if rng.random() < 0.85:
            start = 0 if meta_too and rng.random() < 0.2 else meta_end(data)
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                data, label = self._bytes(data, start)
                labels.append(label)
        return Mutant(data, "; ".join(labels) or "unchanged", name, str(ds.file_meta.TransferSyntaxUID))
