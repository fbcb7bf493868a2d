"""One radiograph in many DICOM encodings, for the imaging and inference tests.

:func:`radiograph` turns the FracAtlas JPEG in ``tests/fixtures/imaging`` into
12-bit (or 8-bit) stored values; :func:`write_dx` writes them as a DX For
Presentation instance (PS3.3 A.26) in Explicit VR Little Endian;
:func:`transcode` re-encodes a file into another transfer syntax with DCMTK
(``dcmconv``, ``dcmcrle``, ``dcmcjpeg``, ``dcmcjpls``) or, for JPEG 2000,
with pydicom's encoder (pylibjpeg-openjpeg).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "DCMTK_TOOLS",
    "FIXTURE_JPEG",
    "TRANSCODINGS",
    "dcmtk_missing",
    "pydicom_file",
    "radiograph",
    "transcode",
    "write_dx",
]

FIXTURE_JPEG = Path(__file__).resolve().parents[1] / "fixtures" / "imaging" / "IMG0000019.jpg"
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DCMTK_TOOLS = ("dcmconv", "dcmcrle", "dcmcjpeg", "dcmcjpls")

# name -> (transfer syntax UID, command prefix or None for pydicom, lossless?)
TRANSCODINGS: dict[str, tuple[str, list[str] | None, bool]] = {
    "implicit_le": (ImplicitVRLittleEndian, ["dcmconv", "+ti"], True),
    "explicit_be": (ExplicitVRBigEndian, ["dcmconv", "+tb"], True),
    "deflate": (DeflatedExplicitVRLittleEndian, ["dcmconv", "+td"], True),
    "rle": (RLELossless, ["dcmcrle"], True),
    "jpeg_lossless_sv1": (JPEGLosslessSV1, ["dcmcjpeg", "+e1"], True),
    "jpeg_lossless_p14": (JPEGLossless, ["dcmcjpeg", "+el"], True),
    "jpegls_lossless": (JPEGLSLossless, ["dcmcjpls", "+el"], True),
    "j2k_lossless": (JPEG2000Lossless, None, True),
    "jpeg_baseline": (JPEGBaseline8Bit, ["dcmcjpeg", "+eb", "+q", "90"], False),
    "jpeg_extended": (JPEGExtended12Bit, ["dcmcjpeg", "+ee", "+q", "90"], False),
    "jpegls_near": (JPEGLSNearLossless, ["dcmcjpls", "+en"], False),
    "j2k_lossy": (JPEG2000, None, False),
}


def pydicom_file(name: str) -> Path:
    """A file from pydicom's test data (pydicom-data), by name."""
    found = get_testdata_file(name)
    if not isinstance(found, str):
        raise FileNotFoundError(f"pydicom test file {name} not found")
    return Path(found)


def dcmtk_missing(tools: Sequence[str] = DCMTK_TOOLS) -> list[str]:
    """The DCMTK tools that are not on ``PATH``."""
    return [tool for tool in tools if shutil.which(tool) is None]


def radiograph(bits: int = 12, source: Path = FIXTURE_JPEG) -> npt.NDArray[np.uint16]:
    """The fixture radiograph as stored values of ``bits`` bits (bright = dense).

    A slight Gaussian blur before quantisation gives the 12-bit version values
    between the 8-bit levels, as a detector would.
    """
    gray = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise FileNotFoundError(source)
    unit = cv2.GaussianBlur(gray.astype(np.float32) / 255.0, (0, 0), 0.8)
    return np.asarray(np.round(unit * (2**bits - 1)), dtype=np.uint16)


def write_dx(
    path: Path,
    stored: npt.NDArray[Any],
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    padding_value: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``stored`` (2-D) as a DX For Presentation instance, Explicit VR Little Endian."""
    allocated = 8 if bits_stored <= 8 else 16
    dtype = (np.int8 if signed else np.uint8) if allocated == 8 else (np.int16 if signed else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Radiograph"
    ds.PatientID = "TEST0001"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "HAND"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(v) for v in stored.shape)
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if padding_value is not None:
        ds.PixelPaddingValue = padding_value
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def transcode(src: Path, dst: Path, name: str) -> Path:
    """Re-encode ``src`` into the transfer syntax of ``TRANSCODINGS[name]``; check the result's syntax."""
    tsyntax, command, _ = TRANSCODINGS[name]
    if command is None:
        ds = pydicom.dcmread(src)
        if tsyntax == JPEG2000Lossless:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        else:
            ds.compress(JPEG2000, j2k_cr=[15], encoding_plugin="pylibjpeg")
        ds.save_as(dst, enforce_file_format=True)
    else:
        subprocess.run([*command, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    written = pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if written != tsyntax:
        raise RuntimeError(f"{name}: wrote {written}, expected {tsyntax}")
    return dst
