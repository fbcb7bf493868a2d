"""Where the test data lives: the shared FracAtlas pool beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FRACATLAS", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
FRACATLAS = Path(os.environ.get("PACS_BRIDGE_FRACATLAS", REPO_ROOT.parent / "shared" / "data" / "fracatlas"))
