"""Dataset readers, splits and input errors of the trainer (no TensorFlow needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pacs_bridge.imaging.preprocess import PreprocessSpec
from trainer.augment import AugmentConfig, augment_batch
from trainer.data import (
    DatasetError,
    Record,
    check_splits,
    detect_layout,
    load_tensors,
    read_dataset,
    read_folder_layout,
    read_fracatlas,
    read_mura_csv,
    read_split_csv,
    split_seed,
    stratified_split,
    write_split_csv,
)
from trainer.metrics import (
    binary_metrics,
    box_area_fraction,
    choose_threshold,
    choose_threshold_at_specificity,
    peak_in_boxes,
)


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, size=size, dtype=np.uint8))
    return path


FRACATLAS_COLUMNS = [
    "image_id",
    "path",
    "fractured",
    "hand",
    "leg",
    "hip",
    "shoulder",
    "mixed",
    "boxes",
    "source_truncated",
]


def _fracatlas(root: Path, rows: list[dict[str, object]], columns: list[str] | None = None) -> Path:
    columns = columns or FRACATLAS_COLUMNS
    for index, row in enumerate(rows):
        folder = "Fractured" if row.get("fractured") == 1 else "Non_fractured"
        row.setdefault("path", f"images/{folder}/{row['image_id']}")
        _image(root / str(row["path"]), seed=index)
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, 0) for c in columns})
    return root


def _rows(n_pos: int, n_neg: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(n_pos + n_neg):
        positive = i < n_pos
        rows.append(
            {
                "image_id": f"IMG{i:04d}.jpg",
                "fractured": int(positive),
                "hand": int(i % 2 == 0),
                "leg": int(i % 2 == 1),
                "boxes": json.dumps([[1, 2, 10, 12]] if positive else []),
                "source_truncated": 0,
            }
        )
    return rows


def test_fracatlas_reader_labels_boxes_and_truncated(tmp_path: Path) -> None:
    rows = _rows(3, 5)
    rows[4]["source_truncated"] = 1
    root = _fracatlas(tmp_path / "fa", rows)
    records = read_fracatlas(root)
    assert len(records) == 7
    assert sum(r.label for r in records) == 3
    first = next(r for r in records if r.image_id == "IMG0000.jpg")
    assert first.boxes == ((1.0, 2.0, 10.0, 12.0),)
    assert first.body_parts == (1, 0, 0, 0)
    assert first.region == "hand"
    assert len(read_fracatlas(root, include_truncated=True)) == 8
    assert detect_layout(root) == "fracatlas"


def test_fracatlas_missing_column_is_refused(tmp_path: Path) -> None:
    root = _fracatlas(tmp_path / "fa", _rows(1, 1), columns=["image_id", "path"])
    with pytest.raises(DatasetError, match="missing column"):
        read_fracatlas(root)


def test_fracatlas_missing_image_is_refused(tmp_path: Path) -> None:
    root = _fracatlas(tmp_path / "fa", _rows(1, 2))
    (root / "images" / "Fractured" / "IMG0000.jpg").unlink()
    with pytest.raises(DatasetError, match="not found"):
        read_fracatlas(root)


@pytest.mark.parametrize(
    ("positive", "negative"),
    [
        ("fractured", "not fractured"),
        ("Fractured", "Non_fractured"),
        ("fractured", "not_fractured"),
        ("Fractured", "normal"),
    ],
)
def test_folder_layout_spellings(tmp_path: Path, positive: str, negative: str) -> None:
    root = tmp_path / "ds"
    for split in ("train", "val", "test"):
        _image(root / split / positive / "a.png", 1)
        _image(root / split / negative / "b.png", 2)
        _image(root / split / negative / "c.jpg", 3)
    records = read_folder_layout(root)
    assert len(records) == 9
    assert {r.split for r in records} == {"train", "val", "test"}
    assert sum(r.label for r in records) == 3
    assert detect_layout(root) == "folders"
    splits = stratified_split(records, seed=1)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 3, 3]


def test_folder_layout_empty_or_missing_class(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _image(root / "train" / "fractured" / "a.png")
    _image(root / "train" / "normal" / "b.png")
    _image(root / "val" / "fractured" / "c.png")
    with pytest.raises(DatasetError, match="missing or empty class folder 'not fractured'"):
        read_folder_layout(root)
    (root / "val" / "normal").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images"):
        read_folder_layout(root)


def test_folder_layout_missing_split(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _image(root / "train" / "fractured" / "a.png")
    _image(root / "train" / "normal" / "b.png")
    with pytest.raises(DatasetError, match="missing split folder 'val'"):
        read_folder_layout(root)


def test_mura_csv_studies(tmp_path: Path) -> None:
    base = tmp_path / "MURA-v1.1"
    s1 = base / "train" / "XR_WRIST" / "patient00001" / "study1_positive"
    s2 = base / "train" / "XR_SHOULDER" / "patient00002" / "study1_negative"
    _image(s1 / "image1.png", 1)
    _image(s1 / "image2.png", 2)
    _image(s2 / "image1.png", 3)
    csv_path = base / "train_labeled_studies.csv"
    csv_path.write_text(
        "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/,1\n"
        "MURA-v1.1/train/XR_SHOULDER/patient00002/study1_negative/,0\n"
    )
    records = read_mura_csv(csv_path)
    assert [r.label for r in records] == [1, 1, 0]
    assert records[0].region == "hand"
    assert records[2].region == "shoulder"
    assert detect_layout(csv_path) == "mura"
    assert len(read_dataset(csv_path)) == 3


def test_mura_csv_header_missing_column(tmp_path: Path) -> None:
    csv_path = tmp_path / "studies.csv"
    csv_path.write_text("study,label\nx/,1\n")
    with pytest.raises(DatasetError, match="missing column"):
        read_mura_csv(csv_path)


def test_mura_csv_missing_study(tmp_path: Path) -> None:
    csv_path = tmp_path / "studies.csv"
    csv_path.write_text("path,label\nnowhere/study1/,1\n")
    with pytest.raises(DatasetError, match="not found"):
        read_mura_csv(csv_path)


def _records(n_pos: int, n_neg: int) -> list[Record]:
    return [
        Record(image_id=f"r{i:03d}", path=Path(f"r{i}.png"), label=int(i < n_pos), body_parts=(1, 0, 0, 0))
        for i in range(n_pos + n_neg)
    ]


def test_stratified_split_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    records = _records(40, 160)
    a = stratified_split(records, seed=7)
    b = stratified_split(list(reversed(records)), seed=7)
    assert {k: [r.image_id for r in v] for k, v in a.items()} == {k: [r.image_id for r in v] for k, v in b.items()}
    assert [sum(r.label for r in a[s]) for s in ("train", "val", "test")] == [28, 6, 6]
    assert len(a["val"]) == 30
    c = stratified_split(records, seed=8)
    assert [r.image_id for r in c["val"]] != [r.image_id for r in a["val"]]
    path = tmp_path / "splits.csv"
    write_split_csv(path, a, seed=7)
    assert split_seed(path) == 7
    again = read_split_csv(path, records)
    assert {k: [r.image_id for r in v] for k, v in again.items()} == {k: [r.image_id for r in v] for k, v in a.items()}


def test_split_with_an_empty_class_is_refused() -> None:
    records = _records(2, 40)
    splits = stratified_split(records, seed=1)
    with pytest.raises(DatasetError, match="no 'fractured' images"):
        check_splits(splits)


def test_split_file_with_unknown_image(tmp_path: Path) -> None:
    path = tmp_path / "splits.csv"
    path.write_text("image_id,split,label,seed\nnope,train,1,3\n")
    with pytest.raises(DatasetError, match="not in the dataset"):
        read_split_csv(path, _records(1, 1))


def test_unreadable_images_reported_before_training(tmp_path: Path) -> None:
    good = _image(tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    records = [Record("good", good, 0), Record("bad", bad, 1)]
    with pytest.raises(DatasetError, match="1 unreadable image"):
        load_tensors(records, PreprocessSpec(size=32))
    tensors = load_tensors(records[:1], PreprocessSpec(size=32))
    assert tensors.images.shape == (1, 32, 32, 1)


def test_augment_keeps_shape_and_range() -> None:
    rng = np.random.default_rng(0)
    batch = rng.random((4, 32, 32, 1), dtype=np.float32)
    out = augment_batch(batch, rng, AugmentConfig(), fill=0.0, clip=(0.0, 1.0))
    assert out.shape == batch.shape
    assert out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert not np.allclose(out, batch)


def test_threshold_rule_and_localisation_helpers() -> None:
    labels = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2, 0.1, 0.05, 0.45, 0.6])
    threshold = choose_threshold(labels, scores, 0.9)
    assert threshold == pytest.approx(0.2)
    assert binary_metrics(labels, scores, threshold)["sensitivity"] == pytest.approx(0.9)
    # Specificity anchor: 2 of the 3 negatives (0.05, 0.45) must fall below; halfway to the next score, 0.5.
    at_spec = choose_threshold_at_specificity(labels, scores, 0.66)
    assert at_spec == pytest.approx((0.45 + 0.5) / 2)
    assert binary_metrics(labels, scores, at_spec)["specificity"] == pytest.approx(2 / 3)
    assert binary_metrics(labels, scores, at_spec)["sensitivity"] == pytest.approx(0.5)
    assert choose_threshold_at_specificity(labels, scores, 1.0) == pytest.approx(0.65)
    with pytest.raises(ValueError, match="negative"):
        choose_threshold_at_specificity(np.ones(3), np.ones(3), 0.7)
    with pytest.raises(ValueError, match="specificity"):
        choose_threshold_at_specificity(labels, scores, 0.0)
    heat = np.zeros((10, 20), dtype=np.float32)
    heat[5, 15] = 1.0
    assert peak_in_boxes(heat, [(14, 4, 16, 6)])
    assert not peak_in_boxes(heat, [(0, 0, 3, 3)])
    assert box_area_fraction((10, 20), [(0, 0, 9, 4)]) == pytest.approx(0.25)


def test_fixture_in_fracatlas_format() -> None:
    root = Path(__file__).resolve().parents[1] / "fixtures" / "fracatlas"
    records = read_fracatlas(root)
    assert len(records) == 10
    assert sum(r.label for r in records) == 5
    assert all(r.boxes for r in records if r.label == 1)
    tensors = load_tensors(records, PreprocessSpec(size=64))
    assert tensors.images.shape == (10, 64, 64, 1)
    assert 0.0 <= float(tensors.images.min()) and float(tensors.images.max()) <= 1.0
