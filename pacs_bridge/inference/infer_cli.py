"""``pacs-bridge infer``: run the fracture model on files from the command line.

Usage::

    pacs-bridge infer [--config FILE] [--model DIR] [--json] [--batch-size N] [--providers LIST] PATH...

The settings are those of ``pacs-bridge serve`` (:func:`pacs_bridge.config.load_settings`:
the TOML file, then ``PACS_BRIDGE_<SECTION>_<KEY>`` variables, then these flags),
and the analysis is the service's (:func:`pacs_bridge.inference.analyse.analyser_from_settings`),
so the same image gets the same probability, boxes and peak in both.

Directories are expanded to the files under them (recursively, sorted, hidden
files skipped). Without ``--json`` a table is printed; with ``--json`` one
JSON object per input per line::

    {"path": ..., "probability": 0.73, "fracture": true, "threshold": 0.42,
     "body_part": "hand", "box": [x0, y0, x1, y1],
     "boxes": [{"box": [x0, y0, x1, y1], "score": 0.81}, ...], "peak": [x, y],
     "model": {"name": ..., "version": ...}}

Coordinates are the image's own pixels (``x1``/``y1`` exclusive); ``box`` is
the top entry of ``boxes``; ``box`` and ``peak`` are ``null`` when the model
points nowhere. An input that cannot be analysed (unreadable, or not a
radiograph: too small, near-constant or noise-like) gives
``{"path": ..., "error": "<reason>"}``.
Exit status: 0 when every input was analysed, 1 when some input failed,
2 for a usage error or when the model cannot be loaded. No traceback is
printed for expected errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from pacs_bridge.config import Settings, load_settings
from pacs_bridge.errors import ConfigError
from pacs_bridge.inference.analyse import ImageFailure, ImageFinding, analyser_from_settings
from pacs_bridge.inference.manifest import ManifestError
from pacs_bridge.inference.model import MODEL_DIR_ENV, default_model_dir

__all__ = ["build_parser", "expand_paths", "infer_main"]

LOGGER = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2


def build_parser(prog: str = "pacs-bridge infer") -> argparse.ArgumentParser:
    """The argument parser of ``pacs-bridge infer``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Run the fracture model on DICOM, PNG or JPEG files (directories are expanded), with the same "
            "[analysis] settings as pacs-bridge serve."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or directories to analyse")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="settings file (TOML), as for serve; default $PACS_BRIDGE_CONFIG, then embedded defaults",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"override [analysis] model_dir (${MODEL_DIR_ENV}); default {default_model_dir()}",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per input per line")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N", help="override [analysis] batch_size")
    parser.add_argument(
        "--providers",
        default=None,
        help="override [analysis] providers: auto (GPU when it works, else CPU), cpu, cuda, tensorrt, or a comma list",
    )
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="override [analysis] intra_op_threads (0 = default)"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")
    return parser


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; directories replaced by the files under them (recursive, sorted, no hidden files)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        else:
            out.append(path)
    return out


def _print_table(results: Sequence[ImageFinding | ImageFailure], stream: TextIO) -> None:
    rows = [("path", "probability", "fracture", "body part", "box")]
    for item in results:
        if isinstance(item, ImageFailure):
            rows.append((item.path, "-", "error", "-", item.reason))
        else:
            box = "-" if item.box is None else ",".join(str(v) for v in item.box)
            rows.append(
                (item.path, f"{item.probability:.3f}", "yes" if item.fracture else "no", item.body_part or "-", box)
            )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(4)] + [row[4]]
        stream.write("  ".join(cells).rstrip() + "\n")


def _load_settings(args: argparse.Namespace) -> Settings:
    analysis: dict[str, Any] = {}
    for flag, key in (
        ("model", "model_dir"),
        ("batch_size", "batch_size"),
        ("providers", "providers"),
        ("threads", "intra_op_threads"),
    ):
        value = getattr(args, flag)
        if value is not None:
            analysis[key] = value
    return load_settings(args.config, overrides={"analysis": analysis} if analysis else None)


def infer_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pacs-bridge infer``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    level = logging.WARNING if args.verbose == 0 else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size is not None and args.batch_size < 1:
        print("pacs-bridge infer: --batch-size must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = _load_settings(args)
    except ConfigError as exc:
        print(f"pacs-bridge infer: invalid settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        analyser = analyser_from_settings(settings, keep_heatmap=False)
    except ManifestError as exc:
        print(f"pacs-bridge infer: cannot load the model: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        print(f"pacs-bridge infer: cannot load the model: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    paths = expand_paths(args.paths)
    if not paths:
        print("pacs-bridge infer: no input files", file=sys.stderr)
        return EXIT_USAGE
    results = analyser.analyse_paths(paths)
    if args.json:
        for item in results:
            sys.stdout.write(json.dumps(item.to_json()) + "\n")
    else:
        _print_table(results, sys.stdout)
    sys.stdout.flush()
    return EXIT_INPUT_FAILED if any(isinstance(r, ImageFailure) for r in results) else EXIT_OK


if __name__ == "__main__":
    sys.exit(infer_main(sys.argv[1:]))
