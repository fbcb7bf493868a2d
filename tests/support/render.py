"""Render a DICOM SR as a picture: DCMTK ``dsr2html``, then a headless Chromium screenshot."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["render_sr_png"]


def render_sr_png(sr_path: Path, png: Path, workdir: Path, window: tuple[int, int] = (900, 1450)) -> Path:
    """Write ``png``, the SR at ``sr_path`` as ``dsr2html`` lays it out; scratch files go to ``workdir``."""
    html = workdir / "sr.html"
    subprocess.run(["dsr2html", str(sr_path), str(html)], check=True)
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={workdir / 'chromium'}",
            f"--screenshot={png}",
            f"--window-size={window[0]},{window[1]}",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=workdir,
    )
    return png
