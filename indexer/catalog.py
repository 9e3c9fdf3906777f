"""What a gallery holds, image by image, and how that differs from its dataset.

Every dataset image of a gallery is either in the manifest (its faces) or in the
failures (why it has none), with its content hash. Images added from outside the
dataset root have absolute paths and are not the dataset's to sync.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from data.images import file_hash
from data.records import LOAD_ERROR, DatasetListing, ImageRecord
from indexer.layout import GalleryInfo, GalleryLayout, read_tables

log = logging.getLogger(__name__)


def is_external(path: str) -> bool:
    """A path outside the dataset root (added with face-index add or the HTTP API)."""
    return os.path.isabs(path)


def gallery_images(layout: GalleryLayout, info: GalleryInfo | None) -> dict[str, str | None]:
    """path -> content hash (None for format-1 parts) of every image the gallery holds."""
    images: dict[str, str | None] = {}
    for files in (layout.manifest_files(info), layout.failure_files(info)):
        table = read_tables(files, ["path", "content_hash"])
        if table is None:
            continue
        hashes = table.column("content_hash").to_pylist() if "content_hash" in table.column_names else [None] * table.num_rows
        images.update(zip(table.column("path").to_pylist(), hashes))
    return images


def read_hash(root: str, path: str) -> str | None:
    try:
        with open(Path(root) / path, "rb") as handle:
            return file_hash(handle.read())
    except OSError:
        return None


@dataclass(frozen=True)
class DatasetDiff:
    """Dataset images the gallery lacks, holds but the dataset lost, and holds with other content."""

    new: tuple[ImageRecord, ...]
    vanished: tuple[str, ...]
    changed: tuple[ImageRecord, ...]
    unhashed: int = 0  # images of format-1 parts, whose content cannot be compared

    @property
    def empty(self) -> bool:
        return not (self.new or self.vanished or self.changed)

    def summary(self) -> str:
        return f"{len(self.new)} new, {len(self.vanished)} vanished, {len(self.changed)} changed"


def dataset_diff(images: Mapping[str, str | None], listing: DatasetListing, hashes: bool = True) -> DatasetDiff:
    """Compare the gallery's dataset images with ``listing``. ``hashes``: read every
    listed file to find changed content (else only new and vanished are found)."""
    listed = {r.path: r for r in listing.records}
    ours = {p: h for p, h in images.items() if not is_external(p)}
    new = tuple(r for p, r in listed.items() if p not in ours)
    vanished = tuple(sorted(p for p in ours if p not in listed))
    changed: list[ImageRecord] = []
    unhashed = 0
    if hashes:
        for path, record in listed.items():
            if path not in ours:
                continue
            stored = ours[path]
            if stored is None:
                if not record.annotations.get(LOAD_ERROR):  # those are never opened: no hash to compare
                    unhashed += 1
                continue
            if read_hash(listing.root, path) != stored:
                changed.append(record)
    if unhashed:
        log.warning("%d images were indexed before content hashes were kept: their content is not compared", unhashed)
    return DatasetDiff(new, vanished, tuple(changed), unhashed)


def records_paths(records: Iterable[ImageRecord]) -> set[str]:
    return {r.path for r in records}
