"""pacs_bridge never imports TensorFlow: import every module and run `infer`, then look at sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from tests.support import fixtures
from tests.support.imaging_samples import FIXTURE_JPEG

tiny_model_dir = fixtures.tiny_model_dir

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib, importlib.abc, json, pkgutil, sys

attempts = []

class Watch(importlib.abc.MetaPathFinder):
    # Records any attempt, even one guarded by try/except ImportError.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras", "tf2onnx"):
            attempts.append(name)
        return None

sys.meta_path.insert(0, Watch())

import pacs_bridge
errors = {}
for info in pkgutil.walk_packages(pacs_bridge.__path__, "pacs_bridge."):
    if info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
    except Exception as exc:  # a module that cannot import is reported, the TF check still runs
        errors[info.name] = f"{type(exc).__name__}: {exc}"

from pacs_bridge.inference.infer_cli import infer_main
code = infer_main(["--model", sys.argv[1], "--json", sys.argv[2]])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras", "tf2onnx"))
print(json.dumps({"code": code, "attempts": attempts, "loaded": loaded, "errors": errors}))
"""


def test_pacs_bridge_does_not_import_tensorflow(tiny_model_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    # A real radiograph: smaller or synthetic images are refused before the model runs.
    cv2.imwrite(str(png), np.asarray(cv2.imread(str(FIXTURE_JPEG), cv2.IMREAD_GRAYSCALE), dtype=np.uint8))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(png)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert "tensorflow" not in report["loaded"] and report["loaded"] == []
    assert report["attempts"] == [], f"pacs_bridge tried to import {report['attempts']}"
    if report["errors"]:
        print("modules that failed to import:", report["errors"])
