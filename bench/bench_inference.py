"""Benchmark the inference path: decode + preprocess, model latency and throughput, whole analysis.

Usage::

    python bench/bench_inference.py [--model DIR] [--providers auto|cpu|cuda] [--runs N]
                                    [--keras PATH.keras] [--output docs/benchmarks-inference.md]

The model defaults to the shipped one (``pacs_bridge.inference.model.default_model_dir()``)
when present, else a tiny contract-conforming model built on the fly (so the
figures then measure the pipeline, not a real network). The test image is a
generated 2500 x 2000 DX (12 bits stored in 16), written in several transfer
syntaxes. ``--keras`` runs the same network's Keras ``predict`` on the same
batches and prints the ratio (TensorFlow is imported only then).

Prints a Markdown report and writes it to ``--output``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacs_bridge.imaging.dicom import decode  # noqa: E402
from pacs_bridge.imaging.preprocess import preprocess  # noqa: E402
from pacs_bridge.inference.analyse import Analyser  # noqa: E402
from pacs_bridge.inference.model import FractureModel, default_model_dir, load_model  # noqa: E402

ROWS, COLS = 2500, 2000
SOURCE = REPO / "tests" / "fixtures" / "imaging" / "IMG0000019.jpg"


def _median_ms(fn: Callable[[], Any], runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def _synthetic_dx() -> npt.NDArray[np.uint16]:
    """A 2500 x 2000 radiograph-like image, 12 bits stored: the fixture upscaled plus detector noise."""
    rng = np.random.default_rng(0)
    if SOURCE.is_file():
        gray = np.asarray(cv2.imread(str(SOURCE), cv2.IMREAD_GRAYSCALE), dtype=np.float32) / 255.0
    else:
        yy, xx = np.mgrid[0:512, 0:410]
        gray = (0.5 + 0.4 * np.sin(xx / 30.0) * np.cos(yy / 40.0)).astype(np.float32)
    big = cv2.resize(gray, (COLS, ROWS), interpolation=cv2.INTER_CUBIC)
    big = big + np.asarray(rng.normal(0.0, 0.01, big.shape), dtype=np.float32)
    return np.asarray(np.clip(big, 0.0, 1.0) * 4095.0 + 0.5, dtype=np.uint16)


def _write_dx(path: Path, stored: npt.NDArray[np.uint16], tsyntax: str) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    if tsyntax != ExplicitVRLittleEndian:
        ds.compress(UID(tsyntax))
    ds.save_as(path, enforce_file_format=True)
    return path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _keras_rows(keras_path: Path, model: FractureModel, runs: int, onnx_b1: float, onnx_b8: float) -> list[str]:
    """Same network in Keras, side by side (TensorFlow imported only here)."""
    try:
        import tensorflow as tf
    except ImportError:
        return ["| Keras predict | TensorFlow not installed | | |"]
    net = tf.keras.models.load_model(keras_path, compile=False)
    size, _, channels = model.input_shape
    rng = np.random.default_rng(1)
    b1 = rng.random((1, size, size, channels), dtype=np.float32)
    b8 = rng.random((8, size, size, channels), dtype=np.float32)

    def call(batch: npt.NDArray[np.float32]) -> Any:
        return net.predict(batch, batch_size=len(batch), verbose=0)

    k1 = _median_ms(lambda: call(b1), runs, warmup=3)
    k8 = _median_ms(lambda: call(b8), max(5, runs // 4), warmup=2)
    keras_out = call(b8)
    if isinstance(keras_out, dict):
        keras_out = keras_out["probability"]
    elif isinstance(keras_out, (list, tuple)):
        keras_out = keras_out[0]
    keras_prob = np.asarray(keras_out).reshape(8, -1)[:, 0]
    diff = float(np.abs(keras_prob - model.predict(b8)["probability"]).max())
    return [
        f"| Keras predict, batch 1 (median) | {k1:.1f} ms | ONNX Runtime is {k1 / onnx_b1:.1f}x faster | |",
        f"| Keras predict, batch 8 | {8000.0 / k8:.1f} images/s | ONNX Runtime is {k8 / onnx_b8:.1f}x faster | |",
        f"| max abs probability difference Keras vs ONNX (batch 8) | {diff:.2e} | | |",
    ]


def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = args.model
        model_note = ""
        if folder is None:
            folder = default_model_dir()
            if not (folder / "model.json").is_file():
                from tests.support.tiny_model import build_tiny_model

                folder = build_tiny_model(tmp / "tiny", size=256, name="tiny-bench")
                model_note = " (no shipped model found: a tiny synthetic 256 px model built on the fly)"
        model = load_model(folder, providers=args.providers, intra_op_threads=args.threads)
        size, _, channels = model.input_shape
        spec = model.manifest.preprocessing

        stored = _synthetic_dx()
        files = {
            "Explicit VR Little Endian": _write_dx(tmp / "le.dcm", stored, ExplicitVRLittleEndian),
            "RLE Lossless": _write_dx(tmp / "rle.dcm", stored, RLELossless),
            "JPEG-LS Lossless": _write_dx(tmp / "jls.dcm", stored, JPEGLSLossless),
            "JPEG 2000 Lossless": _write_dx(tmp / "j2k.dcm", stored, JPEG2000Lossless),
        }
        rows: list[str] = []
        decode_runs = max(3, args.runs // 10)
        for label, path in files.items():
            size_mb = path.stat().st_size / 1e6
            dec = _median_ms(lambda p=path: decode(p), decode_runs)  # type: ignore[misc]
            image = decode(path).pixels
            prep = _median_ms(lambda im=image: preprocess(im, spec), decode_runs)  # type: ignore[misc]
            rows.append(
                f"| decode {ROWS}x{COLS} 16-bit DX, {label} ({size_mb:.1f} MB) | {dec:.1f} ms "
                f"| + preprocess {prep:.1f} ms | {dec + prep:.1f} ms |"
            )
        rng = np.random.default_rng(0)
        b1 = rng.random((1, size, size, channels), dtype=np.float32)
        b8 = rng.random((8, size, size, channels), dtype=np.float32)
        lat1 = _median_ms(lambda: model.predict(b1), args.runs, warmup=3)
        lat8 = _median_ms(lambda: model.predict(b8), max(5, args.runs // 4), warmup=2)
        rows.append(f"| model latency, batch 1 (median of {args.runs}) | {lat1:.2f} ms | | |")
        rows.append(f"| model throughput, batch 8 | {8000.0 / lat8:.1f} images/s | {lat8:.1f} ms per batch | |")
        analyser = Analyser(model, batch_size=8, keep_heatmap=True)
        path = files["Explicit VR Little Endian"]
        whole = _median_ms(lambda: analyser.analyse_paths([path]), max(5, args.runs // 5))
        findings = analyser.analyse_paths([path])
        timings = getattr(findings[0], "timings", {})
        parts = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        rows.append(f"| whole analysis of one DX (decode to box + heatmap), median | {whole:.1f} ms | {parts} | |")
        path8 = files["JPEG 2000 Lossless"]
        whole8 = _median_ms(lambda: analyser.analyse_paths([path8] * 8), 2)
        rows.append(f"| whole analysis, 8 JPEG 2000 DX in one call | {whole8 / 8:.1f} ms per image | | |")
        if args.keras is not None:
            rows.extend(_keras_rows(args.keras, model, args.runs, lat1, lat8))

    header = [
        "# Inference benchmark",
        "",
        f"Command: `python bench/bench_inference.py {' '.join(args.argv)}`".rstrip(),
        "",
        f"- machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        f"- ONNX Runtime {ort.__version__}, provider {model.provider}; pydicom {pydicom.__version__}",
        f"- model: {model.name} {model.version}, input {size}x{size}x{channels}{model_note}",
        f"- image: generated {ROWS}x{COLS} DX, 12 bits stored in 16, MONOCHROME2",
        "",
        "| measure | value | detail | total |",
        "| --- | --- | --- | --- |",
    ]
    notes = [
        "",
        "Notes:",
        "",
        "- Times are medians of repeated runs in one process (warm caches); the decode rows include",
        "  reading the file, the Modality/VOI LUTs (percentile window here) and MONOCHROME handling.",
        "- The whole-analysis row is `Analyser.analyse_paths` on one file: decode, preprocess, ONNX",
        "  Runtime, heatmap mapped back to 2500x2000, box of the hottest region.",
        "- Lossless JPEG 2000 decoding (OpenJPEG/GDCM, single-threaded) dominates the per-image cost",
        "  when a PACS sends J2K; uncompressed, RLE and JPEG-LS are much cheaper.",
        "- On a GPU host: `--providers cuda` (needs `onnxruntime-gpu`); `--keras model.keras` adds the",
        "  Keras side-by-side rows (needs TensorFlow, imported only by this script).",
    ]
    return "\n".join(header + rows + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped one)")
    parser.add_argument("--providers", default="auto", help="auto, cpu, cuda, tensorrt or a comma list")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    parser.add_argument("--runs", type=int, default=50, help="repetitions for the latency median")
    parser.add_argument("--keras", type=Path, default=None, help="the same network as .keras, for a side by side run")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks-inference.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    report = run(args)
    print(report)
    if not args.no_write:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
