"""``pacs-bridge infer``: run the fracture model on files from the command line.

Usage::

    pacs-bridge infer [--model DIR] [--json] [--batch-size N] [--providers LIST] PATH...

Directories are expanded to the files under them (recursively, sorted, hidden
files skipped). Without ``--json`` a table is printed; with ``--json`` one
JSON object per input per line::

    {"path": ..., "probability": 0.73, "fracture": true, "threshold": 0.42,
     "body_part": "hand", "box": [x0, y0, x1, y1], "model": {"name": ..., "version": ...}}

An input that cannot be analysed gives ``{"path": ..., "error": "<reason>"}``.
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
from typing import TextIO

from pacs_bridge.inference.analyse import Analyser, ImageFailure, ImageFinding
from pacs_bridge.inference.manifest import ManifestError
from pacs_bridge.inference.model import MODEL_DIR_ENV, default_model_dir, load_model

__all__ = ["build_parser", "expand_paths", "infer_main"]

LOGGER = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2


def build_parser(prog: str = "pacs-bridge infer") -> argparse.ArgumentParser:
    """The argument parser of ``pacs-bridge infer``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the fracture model on DICOM, PNG or JPEG files (directories are expanded).",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or directories to analyse")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"model folder (model.onnx + model.json); default ${MODEL_DIR_ENV} or {default_model_dir()}",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per input per line")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per model call (default 8)")
    parser.add_argument(
        "--providers",
        default="auto",
        help="ONNX Runtime providers: auto (GPU when it works, else CPU), cpu, cuda, tensorrt, or a comma list",
    )
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="intra-op threads (0 = default)")
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


def infer_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pacs-bridge infer``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    level = logging.WARNING if args.verbose == 0 else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        print("pacs-bridge infer: --batch-size must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        model = load_model(args.model, providers=args.providers, intra_op_threads=args.threads)
    except ManifestError as exc:
        print(f"pacs-bridge infer: cannot load the model: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        print(f"pacs-bridge infer: cannot load the model: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    analyser = Analyser(model, batch_size=args.batch_size, keep_heatmap=False)
    paths = expand_paths(args.paths)
    if not paths:
        print("pacs-bridge infer: no input files", file=sys.stderr)
        return EXIT_USAGE
    try:
        results = analyser.analyse_paths(paths)
    except Exception as exc:
        LOGGER.debug("inference failed", exc_info=True)
        results = [ImageFailure(str(p), f"inference failed: {type(exc).__name__}: {exc}") for p in paths]
    if args.json:
        for item in results:
            sys.stdout.write(json.dumps(item.to_json()) + "\n")
    else:
        _print_table(results, sys.stdout)
    sys.stdout.flush()
    return EXIT_INPUT_FAILED if any(isinstance(r, ImageFailure) for r in results) else EXIT_OK


if __name__ == "__main__":
    sys.exit(infer_main(sys.argv[1:]))
