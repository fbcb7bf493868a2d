"""Pytest fixtures for the imaging and inference tests.

Import the ones a test module needs (``from tests.support.fixtures import
tiny_model``) or register them all from a ``conftest.py`` with
``pytest_plugins = ["tests.support.fixtures"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pacs_bridge.inference.model import FractureModel, load_model
from tests.support.imaging_samples import TRANSCODINGS, dcmtk_missing, radiograph, transcode, write_dx
from tests.support.tiny_model import build_tiny_model

__all__ = ["dx_reference", "dx_reference_8bit", "dx_variant", "tiny_model", "tiny_model_dir"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny contract-conforming model (64 x 64 input)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> FractureModel:
    """The tiny model loaded on the CPU."""
    return load_model(tiny_model_dir, providers="cpu", intra_op_threads=1)


@pytest.fixture(scope="session")
def dx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scratch folder for the DX variants."""
    return tmp_path_factory.mktemp("dx")


@pytest.fixture(scope="session")
def dx_reference(dx_dir: Path) -> Path:
    """The fixture radiograph as a 12-bit DX, Explicit VR Little Endian, MONOCHROME2, no window."""
    return write_dx(dx_dir / "ref12.dcm", radiograph(12))


@pytest.fixture(scope="session")
def dx_reference_8bit(dx_dir: Path) -> Path:
    """The same radiograph stored with 8 bits."""
    return write_dx(dx_dir / "ref8.dcm", radiograph(8), bits_stored=8)


@pytest.fixture(scope="session")
def dx_variant(dx_dir: Path, dx_reference: Path, dx_reference_8bit: Path) -> Callable[[str], Path]:
    """``dx_variant(name)``: the reference re-encoded as ``TRANSCODINGS[name]`` (skips without DCMTK).

    ``jpeg_baseline`` is made from the 8-bit reference (baseline JPEG is 8-bit only).
    """
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            command = TRANSCODINGS[name][1]
            if command is not None:
                missing = dcmtk_missing([command[0]])
                if missing:
                    pytest.skip(f"DCMTK tool not installed: {', '.join(missing)}")
            source = dx_reference_8bit if name == "jpeg_baseline" else dx_reference
            cache[name] = transcode(source, dx_dir / f"{name}.dcm", name)
        return cache[name]

    return make
