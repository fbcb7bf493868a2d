"""Grouped, stratified splits and folds: copies of one radiograph never sit on two sides.

:func:`grouped_split` takes the duplicate groups of :mod:`trainer.duplicates`
and assigns whole groups:

* groups whose copies carry opposite labels are **dropped** (neither label can
  be trusted), and listed;
* the **test** split is either drawn (``test_fraction`` of the groups,
  stratified) or kept inside a previous model's test split (``keep_test``: only
  groups lying wholly in it), so that both models can be compared on images
  neither has seen;
* the rest is dealt into ``folds`` stratified folds (label x body region, the
  largest groups first, each to the fold that needs that stratum most);
  fold ``val_fold`` is the validation split of this run, the other folds train.

``splits.csv`` then carries ``image_id,split,label,seed,group,fold`` (fold is
empty for test images), so any fold can be trained later with
``--cv-fold``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.data import SPLITS, Record
from trainer.duplicates import DuplicateReport, contradictory_groups

LOGGER = logging.getLogger(__name__)

__all__ = ["GroupedSplit", "grouped_split", "read_fold_csv", "write_grouped_csv"]


@dataclass
class GroupedSplit:
    """The outcome: splits, the fold of every non-test image, groups and what was dropped."""

    splits: dict[str, list[Record]]
    fold_of: dict[str, int]
    group_of: dict[str, str]
    dropped: dict[str, list[str]] = field(default_factory=dict)
    folds: int = 5
    val_fold: int = 0

    def for_fold(self, fold: int) -> dict[str, list[Record]]:
        """Splits with fold ``fold`` as validation and the other folds as training (test unchanged)."""
        pool = [r for name in ("train", "val") for r in self.splits[name]]
        val = sorted((r for r in pool if self.fold_of.get(r.image_id) == fold), key=lambda r: r.image_id)
        train = sorted((r for r in pool if self.fold_of.get(r.image_id) != fold), key=lambda r: r.image_id)
        return {"train": train, "val": val, "test": list(self.splits["test"])}


def _stratum(records: Sequence[Record]) -> tuple[int, str]:
    label = max(r.label for r in records)
    return label, records[0].region


def grouped_split(
    records: Sequence[Record],
    duplicates: DuplicateReport,
    *,
    seed: int,
    folds: int = 5,
    val_fold: int = 0,
    test_fraction: float = 0.15,
    keep_test: Iterable[str] | None = None,
) -> GroupedSplit:
    """Split ``records`` by duplicate group (see the module docstring)."""
    if folds < 2 or not 0 <= val_fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= val_fold < folds, got {folds}, {val_fold}")
    dropped = contradictory_groups(records, duplicates)
    dropped_ids = {i for ids in dropped.values() for i in ids}
    by_group: dict[str, list[Record]] = {}
    for r in records:
        if r.image_id in dropped_ids:
            continue
        by_group.setdefault(duplicates.group_of.get(r.image_id, r.image_id), []).append(r)
    rng = np.random.default_rng(seed)
    names = sorted(by_group)
    test_groups: set[str] = set()
    if keep_test is not None:
        previous = set(keep_test)
        test_groups = {g for g in names if all(r.image_id in previous for r in by_group[g])}
    else:
        strata: dict[tuple[int, str], list[str]] = {}
        for g in names:
            strata.setdefault(_stratum(by_group[g]), []).append(g)
        for key in sorted(strata):
            group_names = strata[key]
            order = rng.permutation(len(group_names))
            take = round(len(group_names) * test_fraction)
            test_groups.update(group_names[int(i)] for i in order[:take])
    # Deal the remaining groups into folds: per stratum, shuffled, biggest groups first, to the emptiest fold.
    fold_of_group: dict[str, int] = {}
    strata_rest: dict[tuple[int, str], list[str]] = {}
    for g in names:
        if g not in test_groups:
            strata_rest.setdefault(_stratum(by_group[g]), []).append(g)
    for key in sorted(strata_rest):
        group_names = [strata_rest[key][int(i)] for i in rng.permutation(len(strata_rest[key]))]
        group_names.sort(key=lambda g: -len(by_group[g]))
        load = [0] * folds
        for g in group_names:
            target = min(range(folds), key=lambda f: (load[f], f))
            fold_of_group[g] = target
            load[target] += len(by_group[g])
    fold_of = {r.image_id: fold_of_group[g] for g, recs in by_group.items() if g in fold_of_group for r in recs}
    group_of = {r.image_id: g for g, recs in by_group.items() for r in recs}
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for g, recs in by_group.items():
        for r in recs:
            if g in test_groups:
                splits["test"].append(r)
            else:
                splits["val" if fold_of_group[g] == val_fold else "train"].append(r)
    for name in SPLITS:
        splits[name].sort(key=lambda rec: rec.image_id)
        LOGGER.info(
            "grouped split %-5s %5d images, %4d fractured", name, len(splits[name]), sum(r.label for r in splits[name])
        )
    if dropped:
        LOGGER.info("dropped %d group(s) with contradictory labels: %s", len(dropped), sorted(dropped_ids))
    return GroupedSplit(
        splits=splits, fold_of=fold_of, group_of=group_of, dropped=dropped, folds=folds, val_fold=val_fold
    )


def write_grouped_csv(path: Path, split: GroupedSplit, seed: int) -> None:
    """``image_id,split,label,seed,group,fold`` rows (readable by :func:`trainer.data.read_split_csv`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "split", "label", "seed", "group", "fold"])
        for name in SPLITS:
            for rec in split.splits[name]:
                fold = split.fold_of.get(rec.image_id)
                writer.writerow(
                    [rec.image_id, name, rec.label, seed, split.group_of[rec.image_id], "" if fold is None else fold]
                )


def read_fold_csv(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """The ``fold`` and ``group`` columns of a grouped ``splits.csv`` (empty when absent)."""
    folds: dict[str, int] = {}
    groups: dict[str, str] = {}
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("fold") not in (None, ""):
                folds[row["image_id"]] = int(row["fold"])
            if row.get("group"):
                groups[row["image_id"]] = row["group"]
    return folds, groups
