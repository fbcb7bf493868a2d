"""Decode a DICOM image into a display image (2-D ``float32`` in ``[0, 1]``, bright = bone).

The steps follow the DICOM grayscale pipeline:

1. **Pixel data** (PS3.3 C.7.6.3 Image Pixel module; PS3.5 section 8 and
   Annex A for the encodings): the stored values are decoded with pydicom and
   its plugins (pylibjpeg, GDCM) for every transfer syntax the receiver
   accepts: Implicit/Explicit VR Little Endian, Explicit VR Big Endian,
   Deflated Explicit VR Little Endian, RLE Lossless, JPEG Baseline/Extended,
   JPEG Lossless (Process 14 and SV1), JPEG-LS lossless/near-lossless and
   JPEG 2000 lossless/lossy. 8- to 16-bit, signed or unsigned, any
   ``Bits Stored`` up to ``Bits Allocated``.
2. **Pixel padding** (PS3.3 C.7.5.1.1.2, Pixel Padding Value and Pixel Padding
   Range Limit): padding pixels are excluded from the window and shown black.
3. **Modality LUT** (PS3.3 C.11.1): Rescale Slope/Intercept or a Modality LUT
   Sequence, applied with :func:`pydicom.pixels.apply_modality_lut`.
4. **VOI LUT** (PS3.3 C.11.2): the first VOI LUT Sequence item when present
   (:func:`pydicom.pixels.apply_voi`), else the first Window Center/Width pair
   with its VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID, C.11.2.1.2),
   else a robust percentile window (0.5 % .. 99.5 % of the non-padding pixels).
5. **Presentation** (PS3.3 C.7.6.3.1.2): MONOCHROME1 is inverted so that the
   result is always MONOCHROME2-like (low = black).

Colour images (RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT, e.g. secondary
captures) are converted to RGB by pydicom and then to luminance (ITU-R BT.601
weights); no LUTs apply to them. PALETTE COLOR and other photometric
interpretations are refused.

Multi-frame objects: only the **first frame** is decoded and analysed (a
radiograph series stored as one multi-frame object is rare in projection
radiography; the number of frames is reported in :class:`DecodedImage`).

Every problem raises :class:`DicomDecodeError` (an
:class:`~pacs_bridge.imaging.loader.ImageReadError`, hence a ``ValueError``)
whose message names the file and the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array

from pacs_bridge.imaging.loader import ImageReadError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "DecodedImage",
    "DicomDecodeError",
    "WindowInfo",
    "decode",
    "load_display_image",
]

LOGGER = logging.getLogger(__name__)

FloatImage = npt.NDArray[np.float32]

DEFAULT_MAX_PIXELS = 100_000_000
"""Refuse images with more pixels (rows x columns) than this (100 megapixels)."""

SUPPORTED_TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 and 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1 (Process 14, Selection Value 1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless Only",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
"""Transfer syntaxes decoded here (PS3.5 section 10 and Annex A), UID -> name."""

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PERCENTILES = (0.5, 99.5)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DicomDecodeError(ImageReadError):
    """A DICOM object cannot be decoded as an image; the message names the file and the reason."""


@dataclass(frozen=True)
class WindowInfo:
    """The VOI transformation used to produce the display image.

    ``source`` is ``"voi_lut"`` (VOI LUT Sequence), ``"window"`` (Window
    Center/Width from the dataset), ``"percentile"`` (computed here) or
    ``"colour"`` (colour image scaled by its bit depth). ``center``/``width``
    are in modality (rescaled) units; ``None`` for a VOI LUT.
    """

    source: str
    center: float | None
    width: float | None
    function: str = "LINEAR"


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image in display orientation, and what it was decoded from.

    ``pixels``: 2-D ``float32`` in ``[0, 1]``, MONOCHROME2 orientation
    (bright = dense), padding pixels at 0. ``rows``/``columns`` are the
    original matrix size (equal to ``pixels.shape``).
    """

    pixels: FloatImage
    rows: int
    columns: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    signed: bool
    number_of_frames: int
    frame: int
    window: WindowInfo
    transfer_syntax: str
    sop_class_uid: str | None
    modality: str | None
    padding_pixels: int


def _name(source: Dataset | str | PathLike[str]) -> str:
    if isinstance(source, Dataset):
        filename = getattr(source, "filename", None)
        if isinstance(filename, str) and filename:
            return filename
        sop = source.get("SOPInstanceUID")
        return f"<dataset {sop}>" if sop else "<dataset>"
    return str(source)


def _read(path: Path) -> Dataset:
    if not path.is_file():
        raise DicomDecodeError(f"{path}: no such file")
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as exc:
        raise DicomDecodeError(f"{path}: not a readable DICOM file ({exc})") from exc
    # No preamble/"DICM": accept only if it parses as a dataset with image attributes.
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise DicomDecodeError(f"{path}: not a DICOM file ({exc})") from exc
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        raise DicomDecodeError(f"{path}: not a DICOM file (no DICM prefix and no DICOM attributes)")
    return ds


def _int_attr(ds: Dataset, keyword: str, name: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        raise DicomDecodeError(f"{name}: missing required attribute {keyword}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise DicomDecodeError(f"{name}: invalid {keyword} {value!r}") from exc


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued numeric attribute."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0]
    return float(value)


def _check(ds: Dataset, name: str, max_pixels: int) -> tuple[str, int, int, int, int, bool, int, int]:
    """Validate the Image Pixel module (PS3.3 C.7.6.3) before decoding anything."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DicomDecodeError(f"{name}: float pixel data is not supported")
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None and hasattr(sop, "name") else ""
        raise DicomDecodeError(f"{name}: no Pixel Data (7FE0,0010); not an image object{kind}")
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        raise DicomDecodeError(f"{name}: no Transfer Syntax UID in the file meta information")
    if str(tsyntax) not in SUPPORTED_TRANSFER_SYNTAXES:
        raise DicomDecodeError(f"{name}: unsupported transfer syntax {tsyntax} ({getattr(tsyntax, 'name', '?')})")
    rows = _int_attr(ds, "Rows", name)
    cols = _int_attr(ds, "Columns", name)
    if rows <= 0 or cols <= 0:
        raise DicomDecodeError(f"{name}: zero-size image ({cols}x{rows})")
    if rows * cols > max_pixels:
        raise DicomDecodeError(f"{name}: image too large ({cols}x{rows} = {rows * cols} pixels, limit {max_pixels})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONOCHROME + _COLOUR:
        raise DicomDecodeError(f"{name}: unsupported Photometric Interpretation {photometric or '(missing)'!r}")
    samples = _int_attr(ds, "SamplesPerPixel", name, 1)
    expected_samples = 1 if photometric in _MONOCHROME else 3
    if samples != expected_samples:
        raise DicomDecodeError(
            f"{name}: Samples per Pixel {samples} does not match Photometric Interpretation {photometric}"
        )
    allocated = _int_attr(ds, "BitsAllocated", name)
    if allocated not in (8, 16):
        raise DicomDecodeError(f"{name}: unsupported Bits Allocated {allocated} (8 or 16 supported)")
    stored = _int_attr(ds, "BitsStored", name)
    if not 1 <= stored <= allocated:
        raise DicomDecodeError(f"{name}: invalid Bits Stored {stored} (must be 1..{allocated}, Bits Allocated)")
    high_bit = ds.get("HighBit")
    if high_bit is not None and int(high_bit) != stored - 1:
        raise DicomDecodeError(f"{name}: invalid High Bit {int(high_bit)} (must be Bits Stored - 1 = {stored - 1})")
    signed = _int_attr(ds, "PixelRepresentation", name, 0) == 1
    frames = _int_attr(ds, "NumberOfFrames", name, 1) if ds.get("NumberOfFrames") not in (None, "") else 1
    if frames < 1:
        raise DicomDecodeError(f"{name}: invalid Number of Frames {frames}")
    if not tsyntax.is_compressed:
        per_pixel = 2 if photometric == "YBR_FULL_422" else samples  # PS3.5 8.2.1: 4 values per 2 pixels
        expected = rows * cols * per_pixel * (allocated // 8)
        actual = len(ds.PixelData)
        if actual < expected:
            raise DicomDecodeError(f"{name}: truncated pixel data ({actual} bytes, first frame needs {expected})")
    return str(tsyntax), rows, cols, allocated, stored, signed, frames, samples


_JPEG_FAMILY = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
}
_JPEG2000_FAMILY = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


def _check_codestream(ds: Dataset, tsyntax: str, frames: int, name: str) -> None:
    """Refuse a first frame whose codestream lacks its start or end marker (PS3.5 A.4, ISO 10918-1, 15444-1).

    Some decoders silently fill a truncated JPEG or JPEG-LS scan with
    invented pixels; an interrupted transfer must not become an image.
    """
    if tsyntax not in _JPEG_FAMILY and tsyntax not in _JPEG2000_FAMILY:
        return
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception as exc:
        raise DicomDecodeError(f"{name}: corrupt or truncated encapsulated pixel data ({exc})") from exc
    body = frame.rstrip(b"\x00")
    if tsyntax in _JPEG_FAMILY:
        start_ok = body[:2] == b"\xff\xd8"  # SOI
    else:
        start_ok = body[:2] == b"\xff\x4f" or body[4:8] == b"jP  "  # SOC, or a JP2 file header
    if not start_ok:
        raise DicomDecodeError(f"{name}: corrupt pixel data (the first frame does not start with a codestream)")
    # EOI (JPEG, JPEG-LS) / EOC (JPEG 2000); fragments are padded to an even length, by some
    # encoders with 0xFF, and marker bytes cannot occur inside entropy-coded data.
    if b"\xff\xd9" not in body[-8:]:
        raise DicomDecodeError(f"{name}: truncated pixel data (the first frame's codestream has no end marker)")


def _padding_mask(ds: Dataset, stored: npt.NDArray[Any]) -> npt.NDArray[np.bool_] | None:
    """Pixels equal to Pixel Padding Value, or within its Range Limit (PS3.3 C.7.5.1.1.2)."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    value = int(_first(value))
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        mask = stored == value
    else:
        low, high = sorted((value, int(_first(limit))))
        mask = (stored >= low) & (stored <= high)
    return mask if bool(mask.any()) else None


def _window_linear(values: FloatImage, center: float, width: float, function: str) -> FloatImage:
    """Window Center/Width per PS3.3 C.11.2.1.2, output scaled to ``[0, 1]``."""
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    else:  # LINEAR (C.11.2.1.2.1)
        span = max(width - 1.0, 1e-6)
        out = (values - (center - 0.5)) / span + 0.5
    return np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _histogram_percentiles(
    stored: npt.NDArray[Any], valid: npt.NDArray[np.bool_] | None, percentiles: tuple[float, ...]
) -> list[float] | None:
    """Percentiles of 8/16-bit integers from their histogram; same values as ``np.percentile`` (linear)."""
    if stored.dtype.kind not in "iu" or stored.dtype.itemsize > 2:
        return None
    offset = 0
    if stored.dtype.kind == "i":
        offset = 1 << (8 * stored.dtype.itemsize - 1)
        unsigned = (stored.astype(np.int32) + offset).astype(np.uint16 if stored.dtype.itemsize == 2 else np.uint8)
    else:
        unsigned = stored
    bins = 1 << (8 * stored.dtype.itemsize)
    mask = valid.astype(np.uint8) if valid is not None else None
    hist = cv2.calcHist([np.ascontiguousarray(unsigned)], [0], mask, [bins], [0, bins]).ravel()
    counts = np.cumsum(hist.astype(np.int64))
    total = int(counts[-1])
    if total == 0:
        return None
    result = []
    for q in percentiles:
        position = (total - 1) * q / 100.0
        below = int(np.floor(position))
        fraction = position - below
        # value of the k-th smallest sample (0-based) is the first bin whose cumulative count exceeds k
        lower = int(np.searchsorted(counts, below, side="right"))
        upper = int(np.searchsorted(counts, min(below + 1, total - 1), side="right"))
        result.append(lower + fraction * (upper - lower) - offset)
    return result


def _percentile_range(
    ds: Dataset, stored: npt.NDArray[Any], values: FloatImage, valid: npt.NDArray[np.bool_] | None
) -> tuple[float, float]:
    """The 0.5 % and 99.5 % points of the non-padding modality values.

    With a linear Modality LUT (C.11.1.1.2, Rescale Slope/Intercept) the
    percentiles are taken on the stored integers through a histogram and
    rescaled, which is exact and much faster than sorting.
    """
    if "ModalityLUTSequence" not in ds:
        found = _histogram_percentiles(stored, valid, _PERCENTILES)
        if found is not None:
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
            a, b = (v * slope + intercept for v in found)
            return min(a, b), max(a, b)
    sample = values[valid] if valid is not None and valid.shape == values.shape else values.ravel()
    if sample.size == 0:
        sample = values.ravel()
    low, high = (float(v) for v in np.percentile(sample, _PERCENTILES))
    return low, high


def _apply_voi(
    ds: Dataset,
    stored: npt.NDArray[Any],
    values: FloatImage,
    valid: npt.NDArray[np.bool_] | None,
    name: str,
) -> tuple[FloatImage, WindowInfo]:
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        try:
            # The LUT is indexed by integer modality values (C.11.2.1.1).
            indices = np.rint(values).astype(np.int64)
            out = np.asarray(apply_voi(indices, ds, index=0), dtype=np.float32)
            lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float32)
        except Exception as exc:
            raise DicomDecodeError(f"{name}: invalid VOI LUT Sequence ({exc})") from exc
        low, high = float(lut.min()), float(lut.max())
        scaled = (out - low) / (high - low) if high > low else np.zeros_like(out)
        return np.clip(scaled, 0.0, 1.0).astype(np.float32), WindowInfo("voi_lut", None, None, "LUT")
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = _first(ds.WindowCenter)
            width = _first(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            center, width = float("nan"), float("nan")
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            function = "LINEAR"
        minimum_width = 1.0 if function == "LINEAR" else 0.0
        if np.isfinite(center) and np.isfinite(width) and width > minimum_width:
            return _window_linear(values, center, width, function), WindowInfo("window", center, width, function)
        LOGGER.warning("%s: ignoring invalid window center/width %r/%r", name, center, width)
    low, high = _percentile_range(ds, stored, values, valid)
    if high <= low:
        high = low + 1.0
    out = np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return out, WindowInfo("percentile", (low + high) / 2.0, high - low, "LINEAR_EXACT")


_LOOKUP_CHUNK = 32_768


def _look_up(table: FloatImage, stored: npt.NDArray[Any], minimum: int) -> FloatImage:
    """``table[stored - minimum]`` for 8/16-bit ``stored``, in blocks.

    ``np.take`` turns its indices into 64-bit integers first: over a whole
    radiograph that is a 40 MB temporary for a 10 MB image, and with ``out``
    it buffers unless told the indices are in range. Blocks of 32 K pixels keep
    the indices in cache; the values are the same.
    """
    flat = stored.reshape(-1)
    out = np.empty(flat.shape, dtype=np.float32)
    for start in range(0, flat.size, _LOOKUP_CHUNK):
        block = flat[start : start + _LOOKUP_CHUNK]
        index = block if minimum == 0 else block.astype(np.int32) - minimum
        # Every index is within the table (it spans the stored type), so no bounds check ("clip").
        np.take(table, index, out=out[start : start + _LOOKUP_CHUNK], mode="clip")
    return out.reshape(stored.shape)


def decode(source: Dataset | str | PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode a DICOM file or dataset into a :class:`DecodedImage`.

    ``max_pixels`` caps rows x columns (default 100 megapixels). Multi-frame
    objects: the first frame is decoded. Raises :class:`DicomDecodeError`.
    """
    name = _name(source)
    ds = source if isinstance(source, Dataset) else _read(Path(source))
    tsyntax, rows, cols, allocated, stored_bits, signed, frames, samples = _check(ds, name, max_pixels)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    _check_codestream(ds, tsyntax, frames, name)
    try:
        stored = pixel_array(ds, index=0) if frames > 1 else pixel_array(ds)
    except Exception as exc:
        raise DicomDecodeError(f"{name}: corrupt or truncated pixel data ({type(exc).__name__}: {exc})") from exc
    if not stored.dtype.isnative:  # Explicit VR Big Endian arrives as big-endian integers
        stored = stored.astype(stored.dtype.newbyteorder("="))
    expected_shape = (rows, cols) if samples == 1 else (rows, cols, samples)
    if stored.shape != expected_shape:
        if stored.ndim == len(expected_shape) + 1 and stored.shape[1:] == expected_shape:
            stored = stored[0]
        else:
            raise DicomDecodeError(f"{name}: decoded pixel data has shape {stored.shape}, expected {expected_shape}")

    padding = 0
    tabulated = False
    if photometric in _COLOUR:
        rgb = stored.astype(np.float32) / float(2**stored_bits - 1)
        pixels = np.clip(rgb @ _LUMA, 0.0, 1.0).astype(np.float32)
        window = WindowInfo("colour", None, None, "NONE")
    else:
        mask = _padding_mask(ds, stored)
        valid = ~mask if mask is not None else None
        # Every step from stored value to display value is pointwise; for 8/16-bit
        # integers with rescale slope/intercept, run the chain once over every possible
        # stored value and look the image up in that table (same values, a third of the time).
        tabulate = (
            stored.dtype.kind in "iu"
            and stored.dtype.itemsize <= 2
            and "ModalityLUTSequence" not in ds
            and "VOILUTSequence" not in ds
        )
        info = np.iinfo(stored.dtype) if stored.dtype.kind in "iu" else None
        if tabulate and info is not None:
            domain = np.arange(info.min, info.max + 1, dtype=np.int64).astype(stored.dtype)
            target = domain
        else:
            target = stored
        try:
            values = np.asarray(apply_modality_lut(target, ds), dtype=np.float32)
        except Exception as exc:
            raise DicomDecodeError(f"{name}: invalid Modality LUT ({exc})") from exc
        # Window parameters always come from the whole image (``stored``, ``valid``).
        pixels, window = _apply_voi(ds, stored, values, valid, name)
        if photometric == "MONOCHROME1":
            pixels = 1.0 - pixels
        if tabulate and info is not None:
            if not np.isfinite(pixels).all():  # the table holds every value the image can take
                raise DicomDecodeError(f"{name}: pixel values are not finite after the LUTs")
            pixels = _look_up(np.asarray(pixels, dtype=np.float32), stored, info.min)
            tabulated = True
        if mask is not None:
            pixels[mask] = 0.0
            padding = int(mask.sum())
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if not tabulated and not np.isfinite(pixels).all():
        raise DicomDecodeError(f"{name}: pixel values are not finite after the LUTs")
    sop = ds.get("SOPClassUID")
    modality = ds.get("Modality")
    return DecodedImage(
        pixels=pixels,
        rows=rows,
        columns=cols,
        photometric=photometric,
        bits_allocated=allocated,
        bits_stored=stored_bits,
        signed=signed,
        number_of_frames=frames,
        frame=0,
        window=window,
        transfer_syntax=tsyntax,
        sop_class_uid=str(sop) if sop is not None else None,
        modality=str(modality) if modality is not None else None,
        padding_pixels=padding,
    )


def load_display_image(path: str | PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> FloatImage:
    """Load a DICOM file as a display image (2-D ``float32`` in ``[0, 1]``, bright = bone)."""
    return decode(path, max_pixels=max_pixels).pixels
