"""DICOM decoding: every transfer syntax gives the same display image and input tensor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.utils import pixel_array
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from pacs_bridge.imaging import dicom
from pacs_bridge.imaging.dicom import DecodedImage, DicomDecodeError, decode, load_display_image
from pacs_bridge.imaging.loader import ImageReadError
from pacs_bridge.imaging.loader import load_display_image as load_any
from pacs_bridge.imaging.preprocess import PreprocessSpec, preprocess
from tests.support import fixtures
from tests.support.imaging_samples import TRANSCODINGS, pydicom_file, radiograph, write_dx

dx_dir = fixtures.dx_dir
dx_reference = fixtures.dx_reference
dx_reference_8bit = fixtures.dx_reference_8bit
dx_variant = fixtures.dx_variant

SPEC = PreprocessSpec(size=256)
LOSSLESS = [name for name, (_, _, lossless) in TRANSCODINGS.items() if lossless]


def _tensor(path: Path) -> np.ndarray:
    return preprocess(load_display_image(path), SPEC)[0]


def test_reference_decodes_as_display_image(dx_reference: Path) -> None:
    decoded = decode(dx_reference)
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.dtype == np.float32
    assert decoded.pixels.shape == (decoded.rows, decoded.columns) == (512, 410)
    assert 0.0 <= float(decoded.pixels.min()) and float(decoded.pixels.max()) <= 1.0
    assert decoded.window.source == "percentile"
    assert (decoded.bits_allocated, decoded.bits_stored, decoded.signed) == (16, 12, False)
    assert decoded.number_of_frames == 1
    assert decoded.photometric == "MONOCHROME2"
    # bright = bone: the display image follows the stored values.
    stored = radiograph(12).astype(np.float64)
    assert np.corrcoef(stored.ravel(), decoded.pixels.ravel())[0, 1] > 0.99


def test_loader_dispatches_dicom(dx_reference: Path) -> None:
    np.testing.assert_array_equal(load_any(dx_reference), load_display_image(dx_reference))


@pytest.mark.dcmtk
@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_transfer_syntaxes_give_the_same_tensor(
    name: str, dx_reference: Path, dx_variant: Callable[[str], Path]
) -> None:
    path = dx_variant(name)
    decoded = decode(path)
    assert decoded.transfer_syntax == TRANSCODINGS[name][0]
    np.testing.assert_array_equal(decoded.pixels, load_display_image(dx_reference))
    assert np.abs(_tensor(path) - _tensor(dx_reference)).max() < 1e-6


@pytest.mark.dcmtk
@pytest.mark.parametrize("name", ["jpeg_baseline", "jpeg_extended", "jpegls_near", "j2k_lossy"])
def test_lossy_transfer_syntaxes_decode_close(
    name: str, dx_reference: Path, dx_reference_8bit: Path, dx_variant: Callable[[str], Path]
) -> None:
    path = dx_variant(name)
    reference = dx_reference_8bit if name == "jpeg_baseline" else dx_reference
    decoded = decode(path)
    assert decoded.transfer_syntax == TRANSCODINGS[name][0]
    diff = np.abs(decoded.pixels - load_display_image(reference))
    assert float(diff.mean()) < 0.01


def test_monochrome1_and_monochrome2_give_the_same_tensor(dx_dir: Path, dx_reference: Path) -> None:
    inverted = write_dx(dx_dir / "mono1.dcm", 4095 - radiograph(12), photometric="MONOCHROME1")
    assert decode(inverted).photometric == "MONOCHROME1"
    assert np.abs(_tensor(inverted) - _tensor(dx_reference)).max() < 1e-6


def test_monochrome1_with_window_matches_monochrome2(dx_dir: Path) -> None:
    # The window mirrors too: x' = 4095 - x and c' = 4096 - c (PS3.3 C.11.2.1.2.1 LINEAR).
    m2 = write_dx(dx_dir / "m2w.dcm", radiograph(12), window=(1800.0, 2400.0))
    m1 = write_dx(dx_dir / "m1w.dcm", 4095 - radiograph(12), photometric="MONOCHROME1", window=(2296.0, 2400.0))
    assert decode(m2).window.source == "window"
    assert np.abs(load_display_image(m1) - load_display_image(m2)).max() < 1e-5


def test_signed_pixels_with_rescale_match_unsigned(dx_dir: Path, dx_reference: Path) -> None:
    signed = (radiograph(12).astype(np.int32) - 2048).astype(np.int16)
    path = write_dx(dx_dir / "signed.dcm", signed, signed=True, rescale=(1.0, 2048.0))
    decoded = decode(path)
    assert decoded.signed
    np.testing.assert_allclose(decoded.pixels, load_display_image(dx_reference), atol=1e-6)


def test_bits_stored_below_allocated_ignores_unused_high_bits(dx_dir: Path, dx_reference: Path) -> None:
    # Garbage in the unused bits 12..15 (PS3.5 8.1.1) must not change the image.
    noisy = radiograph(12) | np.uint16(0xA000)
    path = write_dx(dx_dir / "highbits.dcm", noisy)
    np.testing.assert_array_equal(load_display_image(path), load_display_image(dx_reference))


def test_window_center_width_linear(dx_dir: Path) -> None:
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (16, 1))
    path = write_dx(dx_dir / "ramp.dcm", ramp, window=(2048.0, 1025.0))
    pixels = load_display_image(path)
    values = ramp[0].astype(np.float64)
    expected = np.clip((values - 2047.5) / 1024.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(pixels[0], expected, atol=1e-6)


def test_voi_lut_sequence_is_used(dx_dir: Path) -> None:
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (16, 1))
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 16])  # LUT Descriptor: 256 entries, first maps 0, 16 bits
    item.add_new(0x00283006, "US", [int(v) for v in np.linspace(0, 65535, 256)])  # LUT Data
    path = write_dx(dx_dir / "voilut.dcm", ramp, extra={"VOILUTSequence": DicomSequence([item])})
    decoded = decode(path)
    assert decoded.window.source == "voi_lut"
    row = decoded.pixels[0]
    assert row[0] == 0.0 and row[-1] == 1.0
    assert np.all(np.diff(row) >= 0)
    # values beyond the 256-entry LUT saturate at its last entry
    assert np.all(row[16:] == 1.0)


def test_pixel_padding_is_black_and_excluded_from_window(dx_dir: Path, dx_reference: Path) -> None:
    stored = radiograph(12)
    padded = stored.copy()
    padded[:, :40] = 4095  # bright padding on the left edge
    unpadded_ref = write_dx(dx_dir / "nopad.dcm", stored[:, 40:])
    path = write_dx(dx_dir / "padded.dcm", padded, padding_value=4095)
    decoded = decode(path)
    assert decoded.padding_pixels == 512 * 40
    assert np.all(decoded.pixels[:, :40] == 0.0)
    np.testing.assert_allclose(decoded.pixels[:, 40:], load_display_image(unpadded_ref), atol=1e-6)


def test_rgb_secondary_capture_becomes_grayscale(dx_dir: Path) -> None:
    gray = (radiograph(8)).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    path = write_dx(
        dx_dir / "rgb.dcm", gray, bits_stored=8, extra={"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}
    )
    ds = pydicom.dcmread(path)
    ds.PlanarConfiguration = 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(path, enforce_file_format=True)
    decoded = decode(path)
    assert decoded.photometric == "RGB" and decoded.window.source == "colour"
    np.testing.assert_allclose(decoded.pixels, gray / 255.0, atol=1e-5)


def test_ybr_jpeg_secondary_capture() -> None:
    decoded = decode(pydicom_file("SC_rgb_dcmtk_+eb+cy+s4.dcm"))
    assert decoded.pixels.shape == (100, 100)
    assert decoded.photometric.startswith("YBR")
    assert 0.0 <= float(decoded.pixels.min()) <= float(decoded.pixels.max()) <= 1.0


def test_multiframe_uses_first_frame() -> None:
    path = pydicom_file("emri_small.dcm")
    decoded = decode(path)
    assert decoded.number_of_frames == 10 and decoded.frame == 0
    first = pixel_array(path, index=0).astype(np.float64)
    assert np.corrcoef(first.ravel(), decoded.pixels.ravel())[0, 1] > 0.999


@pytest.mark.parametrize(
    ("uncompressed", "jpeg2000"),
    [("RG1_UNCR.dcm", "RG1_J2KR.dcm"), ("RG3_UNCR.dcm", "RG3_J2KR.dcm")],
)
def test_real_computed_radiographs(uncompressed: str, jpeg2000: str) -> None:
    """Real CRs from pydicom-data (a chest and an extremity, MONOCHROME1, 15 and 10 bits)."""
    plain = decode(pydicom_file(uncompressed))
    lossless = decode(pydicom_file(jpeg2000))
    assert plain.photometric == "MONOCHROME1"
    assert plain.window.source == "window"
    np.testing.assert_array_equal(plain.pixels, lossless.pixels)
    # MONOCHROME1 is inverted: the collimated border (high stored values = white in M1) is dark here.
    ds = pydicom.dcmread(pydicom_file(uncompressed))
    stored = ds.pixel_array.astype(np.float64)
    assert np.corrcoef(stored.ravel(), plain.pixels.ravel())[0, 1] < -0.9


def test_dataset_input(dx_reference: Path) -> None:
    ds = pydicom.dcmread(dx_reference)
    np.testing.assert_array_equal(decode(ds).pixels, load_display_image(dx_reference))


# --- errors -----------------------------------------------------------------------------------------------


def _expect_error(path: Path, fragment: str, **kwargs: int) -> DicomDecodeError:
    with pytest.raises(DicomDecodeError) as info:
        decode(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert fragment in message
    assert isinstance(info.value, ImageReadError) and isinstance(info.value, ValueError)
    return info.value


def _modified(src: Path, dst: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_truncated_native_pixel_data(dx_reference: Path, tmp_path: Path) -> None:
    data = pydicom.dcmread(dx_reference).PixelData
    path = _modified(dx_reference, tmp_path / "trunc.dcm", PixelData=data[: len(data) // 2])
    _expect_error(path, "truncated pixel data")


@pytest.mark.dcmtk
@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_truncated_compressed_pixel_data(dx_variant: Callable[[str], Path], tmp_path: Path) -> None:
    raw = dx_variant("jpegls_lossless").read_bytes()
    path = tmp_path / "trunc-jls.dcm"
    path.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(DicomDecodeError) as info:
        decode(path)
    assert str(path) in str(info.value)


@pytest.mark.dcmtk
@pytest.mark.parametrize("name", ["jpeg_lossless_sv1", "jpegls_lossless", "j2k_lossless", "rle"])
def test_cut_compressed_frame(name: str, dx_variant: Callable[[str], Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(dx_variant(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])  # a transfer cut short inside the scan
    path = tmp_path / "corrupt.dcm"
    ds.save_as(path)
    _expect_error(path, "truncated pixel data")


def test_missing_pixel_data(dx_reference: Path, tmp_path: Path) -> None:
    path = _modified(dx_reference, tmp_path / "nopixels.dcm", PixelData=None)
    _expect_error(path, "no Pixel Data")


def test_structured_report_is_not_an_image(tmp_path: Path) -> None:
    path = Path(pydicom_file("test-SR.dcm"))
    with pytest.raises(DicomDecodeError, match="not an image object"):
        decode(path)


def test_zero_size_image(dx_reference: Path, tmp_path: Path) -> None:
    path = _modified(dx_reference, tmp_path / "zero.dcm", Rows=0)
    _expect_error(path, "zero-size image")


def test_huge_image_is_refused(dx_reference: Path, tmp_path: Path) -> None:
    path = _modified(dx_reference, tmp_path / "huge.dcm", Rows=20000, Columns=20000)
    _expect_error(path, "image too large")
    _expect_error(dx_reference, "limit 1000", max_pixels=1000)


def test_wrong_bits_stored(dx_reference: Path, tmp_path: Path) -> None:
    _expect_error(_modified(dx_reference, tmp_path / "b20.dcm", BitsStored=20, HighBit=19), "invalid Bits Stored 20")
    _expect_error(_modified(dx_reference, tmp_path / "hb.dcm", HighBit=15), "invalid High Bit")


def test_unsupported_photometric(dx_reference: Path, tmp_path: Path) -> None:
    path = _modified(dx_reference, tmp_path / "hsv.dcm", PhotometricInterpretation="PALETTE COLOR")
    _expect_error(path, "unsupported Photometric Interpretation")


def test_unsupported_transfer_syntax(dx_reference: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(dx_reference)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 Main Profile
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path)
    _expect_error(path, "unsupported transfer syntax")


def test_not_a_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"this is not DICOM" * 20)
    _expect_error(path, "not a DICOM file")
    _expect_error(tmp_path / "absent.dcm", "no such file")


def test_supported_syntaxes_are_listed() -> None:
    assert set(TRANSCODINGS[name][0] for name in TRANSCODINGS) <= set(dicom.SUPPORTED_TRANSFER_SYNTAXES)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("JPGExtended.dcm", (1024, 256)),  # 12-bit JPEG Extended, fragment padded with 0xFF after EOI
        ("JPEG-LL.dcm", (1024, 256)),  # JPEG Lossless SV1
        ("MR2_J2KI.dcm", (1024, 1024)),  # lossy JPEG 2000
        ("SC_ybr_full_422_uncompressed.dcm", (100, 100)),  # native YBR_FULL_422 (4 values per 2 pixels)
        ("MR_small_bigendian.dcm", (64, 64)),
        ("vlut_04.dcm", (512, 512)),  # VOI LUT Sequence
    ],
)
def test_reference_files_from_pydicom(name: str, shape: tuple[int, int]) -> None:
    decoded = decode(pydicom_file(name))
    assert decoded.pixels.shape == shape
    assert 0.0 <= float(decoded.pixels.min()) <= float(decoded.pixels.max()) <= 1.0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int8, np.int16])
def test_table_look_up_in_blocks_gives_the_table_values(dtype: type) -> None:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(3)
    table = rng.random(int(info.max) - int(info.min) + 1, dtype=np.float32)
    # Not a multiple of the block size, and every extreme value present.
    stored = rng.integers(info.min, int(info.max) + 1, size=(301, 257), dtype=dtype)
    stored[0, :2] = (info.min, info.max)
    looked_up = dicom._look_up(table, stored, int(info.min))
    assert looked_up.shape == stored.shape and looked_up.dtype == np.float32
    np.testing.assert_array_equal(looked_up, table[stored.astype(np.int64) - int(info.min)])


def test_preprocess_clips_only_what_is_out_of_range() -> None:
    rng = np.random.default_rng(5)
    inside = rng.random((300, 200), dtype=np.float32)
    outside = inside * np.float32(2.0) - np.float32(0.5)
    np.testing.assert_array_equal(preprocess(outside, SPEC)[0], preprocess(np.clip(outside, 0.0, 1.0), SPEC)[0])
    before = inside.copy()
    preprocess(inside, SPEC)
    np.testing.assert_array_equal(inside, before)  # the caller's image is not changed
