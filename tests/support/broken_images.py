"""Radiographs whose pixel data breaks the decoders, for fault tests.

A bit-flipped RLE Lossless image makes pylibjpeg-rle's native decoder panic
(``pyo3_runtime.PanicException``, a ``BaseException``) or raise; both must
fail that one image and nothing else.
"""

from __future__ import annotations

import copy
import random

from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

__all__ = ["decoder_panic_rle"]


def _panics(ds: Dataset) -> bool:
    try:
        ds.pixel_array  # noqa: B018 - decoding is the point
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return type(exc).__name__ == "PanicException"
    return False


def decoder_panic_rle(ds: Dataset, seed: int = 1) -> Dataset:
    """A copy of ``ds``, RLE Lossless, whose pixel data makes the native RLE decoder panic."""
    encoded = copy.deepcopy(ds)
    encoded.compress(RLELossless)
    raw = bytes(encoded.PixelData)
    rng = random.Random(seed)
    for _ in range(500):
        flipped = bytearray(raw)
        for _ in range(rng.randint(1, 20)):
            index = rng.randrange(16, len(flipped))
            flipped[index] ^= 1 << rng.randrange(8)
        candidate = copy.deepcopy(encoded)
        candidate.PixelData = bytes(flipped)
        if _panics(candidate):
            return candidate
    raise RuntimeError("no bit flip made the RLE decoder panic; has the decoder changed?")
