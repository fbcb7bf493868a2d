"""Dataset readers, reproducible splits and in-memory tensor caches.

Three layouts are understood:

* **FracAtlas** (``labels.csv`` + ``images/...``): one row per image with
  ``image_id``, ``path``, ``fractured`` and optionally body-region flags,
  fracture ``boxes`` and ``source_truncated``.
* **Folder layout**: ``<root>/{train,val,test}/{fractured,not fractured}/``
  (class folder spellings such as ``Fractured``, ``not_fractured``,
  ``Non_fractured`` or ``normal`` are accepted; ``valid``/``validation`` and
  ``testing`` are accepted for the split folders).
* **MURA-style CSV**: ``path,label`` rows (with or without a header) where
  ``path`` is a study folder holding the images of that study.

Every problem that would only show up halfway through training (a missing
or empty class folder, an unreadable image, a CSV without the needed
columns, a split without one of the classes) raises :class:`DatasetError`
before any model is built.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.loader import load_display_image
from pacs_bridge.imaging.preprocess import Letterbox, PreprocessSpec, preprocess
from trainer import BODY_PARTS

LOGGER = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "DatasetError",
    "Record",
    "TensorSet",
    "check_splits",
    "detect_layout",
    "load_tensors",
    "read_dataset",
    "read_folder_layout",
    "read_fracatlas",
    "read_mura_csv",
    "read_split_csv",
    "stratified_split",
    "write_split_csv",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}

_POSITIVE_DIRS = {"fractured", "fracture", "positive", "abnormal"}
_NEGATIVE_DIRS = {
    "not fractured",
    "not_fractured",
    "not-fractured",
    "notfractured",
    "non_fractured",
    "non fractured",
    "non-fractured",
    "nonfractured",
    "normal",
    "negative",
}
_SPLIT_DIRS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
_FRACATLAS_REQUIRED = ("image_id", "path", "fractured")
_MURA_REGIONS = {
    "XR_HAND": "hand",
    "XR_FINGER": "hand",
    "XR_WRIST": "hand",
    "XR_SHOULDER": "shoulder",
    "XR_HUMERUS": "shoulder",
}


class DatasetError(ValueError):
    """The dataset cannot be used for training; the message says why and where."""


@dataclass(frozen=True)
class Record:
    """One image with its labels.

    ``body_parts`` holds one 0/1 flag per entry of :data:`trainer.BODY_PARTS`
    (several may be set; all zero when unknown). ``boxes`` are fracture boxes
    ``[x0, y0, x1, y1]`` in the image's own pixels.
    """

    image_id: str
    path: Path
    label: int
    body_parts: tuple[int, ...] = (0, 0, 0, 0)
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    split: str | None = None
    truncated: bool = False

    @property
    def region(self) -> str:
        """The body region for reporting: a name, ``mixed`` or ``unknown``."""
        names = [name for name, flag in zip(BODY_PARTS, self.body_parts, strict=True) if flag]
        if not names:
            return "unknown"
        return names[0] if len(names) == 1 else "mixed"


@dataclass
class TensorSet:
    """Preprocessed model inputs of some records, kept in memory."""

    records: list[Record]
    images: npt.NDArray[np.float32]
    letterboxes: list[Letterbox] = field(default_factory=list)

    @property
    def labels(self) -> npt.NDArray[np.float32]:
        """Fracture labels as a ``(N, 1)`` float array."""
        return np.array([[r.label] for r in self.records], dtype=np.float32)

    @property
    def body_targets(self) -> npt.NDArray[np.float32]:
        """Body-region targets, multi-hot rows normalised to sum 1 (zeros when unknown)."""
        flags = np.array([r.body_parts for r in self.records], dtype=np.float32).reshape(-1, len(BODY_PARTS))
        sums = flags.sum(axis=1, keepdims=True)
        targets: npt.NDArray[np.float32] = np.divide(flags, sums, out=np.zeros_like(flags), where=sums > 0)
        return targets


# --------------------------------------------------------------------------- readers


def _as_int(value: str, where: str) -> int:
    try:
        return int(float(value))
    except ValueError as exc:
        raise DatasetError(f"{where}: expected a number, got {value!r}") from exc


def read_fracatlas(root: Path, include_truncated: bool = False) -> list[Record]:
    """Read a FracAtlas-style ``labels.csv`` under ``root``.

    Images flagged ``source_truncated`` are left out unless
    ``include_truncated`` is set.
    """
    root = Path(root)
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: labels.csv not found")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        missing = [c for c in _FRACATLAS_REQUIRED if c not in columns]
        if missing:
            raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    records: list[Record] = []
    skipped = 0
    for number, row in enumerate(rows, start=2):
        where = f"{csv_path}:{number}"
        label = _as_int(row["fractured"], where)
        if label not in (0, 1):
            raise DatasetError(f"{where}: 'fractured' must be 0 or 1, got {label}")
        truncated = bool(_as_int(row.get("source_truncated") or "0", where))
        if truncated and not include_truncated:
            skipped += 1
            continue
        parts = tuple(_as_int(row.get(name) or "0", where) for name in BODY_PARTS)
        boxes_text = (row.get("boxes") or "").strip() or "[]"
        try:
            raw_boxes = json.loads(boxes_text)
            boxes = tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in raw_boxes)
        except (ValueError, TypeError, IndexError) as exc:
            raise DatasetError(f"{where}: unreadable 'boxes' value {boxes_text!r}") from exc
        records.append(
            Record(
                image_id=row["image_id"],
                path=root / row["path"],
                label=label,
                body_parts=parts,
                boxes=boxes,
                truncated=truncated,
            )
        )
    if skipped:
        LOGGER.info("left out %d image(s) flagged source_truncated", skipped)
    if not records:
        raise DatasetError(f"{csv_path}: no usable rows")
    _check_files_exist(records)
    return records


def _class_of(folder_name: str) -> int | None:
    name = folder_name.strip().lower()
    if name in _POSITIVE_DIRS:
        return 1
    if name in _NEGATIVE_DIRS:
        return 0
    return None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder_layout(root: Path) -> list[Record]:
    """Read ``<root>/{train,val,test}/{fractured,not fractured}/`` images.

    Every split folder that exists must hold both a positive and a negative
    class folder with at least one image; ``train`` and ``val`` must exist
    (``test`` may be absent).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    records: list[Record] = []
    found_splits: list[str] = []
    for split, spellings in _SPLIT_DIRS.items():
        folders = [root / s for s in spellings if (root / s).is_dir()]
        folders += [p for p in root.iterdir() if p.is_dir() and p.name.lower() in spellings and p not in folders]
        if not folders:
            continue
        split_dir = folders[0]
        found_splits.append(split)
        by_class: dict[int, list[Path]] = {0: [], 1: []}
        for child in sorted(split_dir.iterdir()):
            if not child.is_dir():
                continue
            cls = _class_of(child.name)
            if cls is None:
                LOGGER.warning("%s: ignoring folder with an unknown class name", child)
                continue
            images = _images_in(child)
            if not images:
                raise DatasetError(f"{child}: class folder holds no images")
            by_class[cls].extend(images)
        for cls, name in ((1, "fractured"), (0, "not fractured")):
            if not by_class[cls]:
                raise DatasetError(f"{split_dir}: missing or empty class folder '{name}'")
        for cls, paths in by_class.items():
            for path in paths:
                image_id = str(path.relative_to(root))
                records.append(Record(image_id=image_id, path=path, label=cls, split=split))
    for needed in ("train", "val"):
        if needed not in found_splits:
            raise DatasetError(f"{root}: missing split folder '{needed}' (expected train/, val/, test/)")
    return records


def read_mura_csv(csv_path: Path, root: Path | None = None) -> list[Record]:
    """Read MURA-style ``path,label`` rows; each path is a study folder of images.

    Relative paths are resolved against ``root`` (default: the CSV's folder
    and, failing that, its parent, since MURA's paths start with the dataset
    folder name). A header row is optional; if present it must name
    ``path`` and ``label`` columns.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: CSV not found")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise DatasetError(f"{csv_path}: empty CSV")
    path_col, label_col = 0, 1
    first = [cell.strip().lower() for cell in rows[0]]
    if not _looks_like_label(first[-1] if first else ""):
        missing = [c for c in ("path", "label") if c not in first]
        if missing:
            raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        path_col, label_col = first.index("path"), first.index("label")
        rows = rows[1:]
    bases = [Path(root)] if root is not None else [csv_path.parent, csv_path.parent.parent]
    records: list[Record] = []
    for number, row in enumerate(rows, start=1):
        where = f"{csv_path}:{number}"
        if len(row) <= max(path_col, label_col):
            raise DatasetError(f"{where}: expected 'path,label', got {row!r}")
        label = _as_int(row[label_col].strip(), where)
        if label not in (0, 1):
            raise DatasetError(f"{where}: label must be 0 or 1, got {label}")
        rel = Path(row[path_col].strip())
        study = rel if rel.is_absolute() else next((b / rel for b in bases if (b / rel).exists()), bases[0] / rel)
        if study.is_file():
            images = [study]
        elif study.is_dir():
            images = _images_in(study)
        else:
            raise DatasetError(f"{where}: study path not found: {study}")
        if not images:
            raise DatasetError(f"{where}: study folder holds no images: {study}")
        region = next((r for key, r in _MURA_REGIONS.items() if key in str(rel).upper()), None)
        parts = tuple(int(name == region) for name in BODY_PARTS)
        for image in images:
            records.append(Record(image_id=str(image), path=image, label=label, body_parts=parts))
    return records


def _looks_like_label(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _check_files_exist(records: Iterable[Record]) -> None:
    missing = [str(r.path) for r in records if not r.path.is_file()]
    if missing:
        shown = ", ".join(missing[:5])
        raise DatasetError(f"{len(missing)} image file(s) not found, e.g. {shown}")


def detect_layout(source: Path) -> str:
    """Name the layout of ``source``: ``fracatlas``, ``folders`` or ``mura``."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return "mura"
    if (source / "labels.csv").is_file():
        return "fracatlas"
    if source.is_dir() and any((source / s).is_dir() for spellings in _SPLIT_DIRS.values() for s in spellings):
        return "folders"
    raise DatasetError(
        f"{source}: not a known dataset layout (labels.csv, train/val/test folders, or a path,label CSV)"
    )


def read_dataset(source: Path, layout: str = "auto", include_truncated: bool = False) -> list[Record]:
    """Read any supported layout (``auto`` detects it)."""
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: dataset not found")
    kind = detect_layout(source) if layout == "auto" else layout
    if kind == "fracatlas":
        return read_fracatlas(source, include_truncated=include_truncated)
    if kind == "folders":
        return read_folder_layout(source)
    if kind == "mura":
        return read_mura_csv(source)
    raise DatasetError(f"unknown layout {layout!r}")


# --------------------------------------------------------------------------- splits


def stratified_split(
    records: Sequence[Record],
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    by_region: bool = True,
) -> dict[str, list[Record]]:
    """Split by image, stratified by label (and body region), deterministically from ``seed``.

    Records that already carry a split (folder layout) keep it. Stratifying
    by region as well needs enough images per region; small subsets should
    pass ``by_region=False``.
    """
    if all(r.split for r in records):
        out: dict[str, list[Record]] = {s: [] for s in SPLITS}
        for r in records:
            out[r.split or "train"].append(r)
        return out
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    strata: dict[tuple[int, str], list[Record]] = {}
    for r in sorted(records, key=lambda rec: rec.image_id):
        strata.setdefault((r.label, r.region if by_region else ""), []).append(r)
    out = {s: [] for s in SPLITS}
    for key in sorted(strata):
        group = strata[key]
        order = rng.permutation(len(group))
        n_val = round(len(group) * fractions[1])
        n_test = round(len(group) * fractions[2])
        for rank, index in enumerate(order):
            rec = group[int(index)]
            split = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
            out[split].append(rec)
    for split in SPLITS:
        out[split].sort(key=lambda rec: rec.image_id)
    return out


def write_split_csv(path: Path, splits: dict[str, list[Record]], seed: int) -> None:
    """Write ``image_id,split,label,seed`` rows so the split can be reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "split", "label", "seed"])
        for split in SPLITS:
            for rec in splits.get(split, []):
                writer.writerow([rec.image_id, split, rec.label, seed])


def read_split_csv(path: Path, records: Sequence[Record]) -> dict[str, list[Record]]:
    """Apply a split file written by :func:`write_split_csv` to ``records``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: split file not found")
    by_id = {r.image_id: r for r in records}
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("image_id", "split") if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
        for row in reader:
            split = row["split"]
            if split not in out:
                raise DatasetError(f"{path}: unknown split {split!r}")
            rec = by_id.get(row["image_id"])
            if rec is None:
                raise DatasetError(f"{path}: image {row['image_id']!r} is not in the dataset")
            out[split].append(rec)
    return out


def split_seed(path: Path) -> int | None:
    """The seed recorded in a split file, if any."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            value = row.get("seed")
            return int(value) if value not in (None, "") else None
    return None


def check_splits(splits: dict[str, list[Record]], required: Sequence[str] = ("train", "val")) -> None:
    """Refuse splits in which a class is missing (every non-empty or required split)."""
    for split in SPLITS:
        recs = splits.get(split, [])
        if not recs and split not in required:
            continue
        positives = sum(r.label for r in recs)
        if positives == 0 or positives == len(recs):
            cls = "fractured" if positives == 0 else "not fractured"
            raise DatasetError(f"split '{split}' has no '{cls}' images ({len(recs)} image(s) in all)")


# --------------------------------------------------------------------------- tensors


def load_tensors(records: Sequence[Record], spec: PreprocessSpec) -> TensorSet:
    """Read and preprocess every record; all unreadable files are reported at once."""
    images = np.empty((len(records), spec.size, spec.size, spec.channels), dtype=np.float32)
    boxes: list[Letterbox] = []
    errors: list[str] = []
    for index, rec in enumerate(records):
        try:
            display = load_display_image(rec.path)
            tensor, box = preprocess(display, spec)
        except (ValueError, OSError) as exc:
            errors.append(f"{rec.path}: {exc}")
            continue
        images[index] = tensor
        boxes.append(box)
    if errors:
        shown = "\n  ".join(errors[:10])
        raise DatasetError(f"{len(errors)} unreadable image(s):\n  {shown}")
    return TensorSet(records=list(records), images=images, letterboxes=boxes)
