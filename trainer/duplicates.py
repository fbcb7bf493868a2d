"""Duplicate and near-duplicate radiographs, grouped so that a group never straddles two splits.

FracAtlas holds pairs of the same radiograph under two file names (some of
them with opposite labels). An evaluation that lets one copy train the model
and the other test it measures memory, not skill. Two hashes find them:

* an **exact hash**: SHA-256 of the decoded 8-bit pixels (same picture,
  different file bytes still match);
* a **perceptual hash** (difference hash, 64 bits): the image resized with
  area averaging to 9 x 8, one bit per horizontal neighbour comparison. Two
  images are near-duplicates when the Hamming distance of their hashes is at
  most ``max_distance`` *and* their 32 x 32 thumbnails differ by at most
  ``max_thumb_diff`` on average (grey levels in ``[0, 1]``); the second test
  keeps apart different radiographs that share a coarse layout.

Near-duplicate pairs are joined transitively (union-find) into groups;
:func:`find_groups` gives every image a group id (the smallest image id of
its group). :func:`contradictory_groups` lists groups whose copies carry
opposite labels.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.loader import load_display_image
from trainer.data import Record

LOGGER = logging.getLogger(__name__)

__all__ = ["DuplicateReport", "ImageHashes", "contradictory_groups", "find_groups", "hash_image", "hash_records"]


@dataclass(frozen=True)
class ImageHashes:
    """Hashes of one image: exact pixel digest, 64-bit difference hash, 32 x 32 thumbnail."""

    exact: str
    dhash: int
    thumb: npt.NDArray[np.float32]


@dataclass
class DuplicateReport:
    """Groups of duplicates: ``group_of[image_id]`` and the groups with more than one image."""

    group_of: dict[str, str]
    groups: dict[str, list[str]]
    exact_pairs: int
    near_pairs: int

    def summary(self) -> dict[str, int]:
        """Counts for the model card."""
        sizes = [len(v) for v in self.groups.values()]
        return {
            "groups_with_copies": len(sizes),
            "images_in_groups": int(sum(sizes)),
            "exact_pairs": self.exact_pairs,
            "near_pairs": self.near_pairs,
        }


def hash_image(image: npt.NDArray[np.floating]) -> ImageHashes:
    """Hashes of a display image (2-D, ``[0, 1]``)."""
    u8 = np.clip(np.asarray(image, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    digest = hashlib.sha256(np.ascontiguousarray(u8).tobytes() + str(u8.shape).encode()).hexdigest()
    small = cv2.resize(u8, (9, 8), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    dhash = int(sum(1 << i for i, b in enumerate(bits) if b))
    thumb = cv2.resize(u8, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32) / np.float32(255.0)
    return ImageHashes(exact=digest, dhash=dhash, thumb=thumb)


def hash_records(records: Sequence[Record]) -> list[ImageHashes]:
    """Hash every record's image (read as the service reads it)."""
    return [hash_image(load_display_image(r.path)) for r in records]


def _popcount64(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    return np.bitwise_count(values).astype(np.int64)


def find_groups(
    records: Sequence[Record],
    hashes: Sequence[ImageHashes] | None = None,
    *,
    max_distance: int = 4,
    max_thumb_diff: float = 0.015,
) -> DuplicateReport:
    """Group exact and near-duplicate images (see the module docstring for the rule)."""
    if hashes is None:
        hashes = hash_records(records)
    n = len(records)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    exact_pairs = 0
    by_exact: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if h.exact in by_exact:
            join(by_exact[h.exact], i)
            exact_pairs += 1
        else:
            by_exact[h.exact] = i
    codes = np.array([h.dhash for h in hashes], dtype=np.uint64)
    thumbs = np.stack([h.thumb for h in hashes]) if n else np.zeros((0, 32, 32), np.float32)
    near_pairs = 0
    for i in range(n - 1):
        distance = _popcount64(codes[i + 1 :] ^ codes[i])
        for offset in np.flatnonzero(distance <= max_distance):
            j = i + 1 + int(offset)
            if hashes[i].exact == hashes[j].exact:
                continue
            if float(np.mean(np.abs(thumbs[i] - thumbs[j]))) <= max_thumb_diff:
                join(i, j)
                near_pairs += 1
    members: dict[int, list[str]] = {}
    for i in range(n):
        members.setdefault(root(i), []).append(records[i].image_id)
    group_of: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for ids in members.values():
        gid = min(ids)
        for image_id in ids:
            group_of[image_id] = gid
        if len(ids) > 1:
            groups[gid] = sorted(ids)
    LOGGER.info(
        "duplicates: %d exact pair(s), %d near pair(s), %d group(s) holding %d image(s)",
        exact_pairs,
        near_pairs,
        len(groups),
        sum(len(v) for v in groups.values()),
    )
    return DuplicateReport(group_of=group_of, groups=groups, exact_pairs=exact_pairs, near_pairs=near_pairs)


def contradictory_groups(records: Sequence[Record], report: DuplicateReport) -> dict[str, list[str]]:
    """Groups whose images carry both labels (fractured and not fractured)."""
    label = {r.image_id: r.label for r in records}
    return {gid: ids for gid, ids in report.groups.items() if len({label[i] for i in ids if i in label}) > 1}
