"""Inference latency of the shipped model: Keras (TensorFlow) vs ONNX Runtime.

Usage::

    python bench/bench_inference_keras.py [--model models/fracatlas-cnn] [--batch 1 8] [--repeat 20]

Runs the same preprocessed random batch through ``model.keras`` and
``model.onnx`` and prints the median and 90th-percentile time per batch and
per image, plus the largest output difference. Needs the ``train`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

LOGGER = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def _time(fn: Any, repeat: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str]) -> int:
    """Run the benchmark and print a small table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "fracatlas-cnn")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import keras
    import onnxruntime as ort
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    manifest = json.loads((args.model / "model.json").read_text())
    size, channels = manifest["input"]["size"], manifest["input"]["channels"]
    model = keras.models.load_model(args.model / "model.keras", compile=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.model / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    print(f"{'runtime':<14}{'batch':>6}{'median ms':>12}{'p90 ms':>10}{'ms/image':>10}")
    for batch in args.batch:
        x = rng.random((batch, size, size, channels), dtype=np.float32)
        keras_out = model(x, training=False)
        onnx_out = session.run(["probability"], {"image": x})[0]
        diff = float(np.max(np.abs(np.asarray(keras_out["probability"]) - onnx_out)))
        for name, fn in (
            ("keras", lambda x=x: model(x, training=False)),
            ("onnxruntime", lambda x=x: session.run(None, {"image": x})),
        ):
            times = sorted(_time(fn, args.repeat))
            median = statistics.median(times) * 1e3
            p90 = times[int(0.9 * (len(times) - 1))] * 1e3
            print(f"{name:<14}{batch:>6}{median:>12.1f}{p90:>10.1f}{median / batch:>10.1f}")
        print(f"{'':<14}{batch:>6}  max |keras - onnx| probability = {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
