"""Typed records that dataset readers produce."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset.

    path: POSIX path relative to the dataset root (stable across machines).
    identity: the person's label as a string, or None when the dataset has none.
    split: "train", "val", "test" or None.
    annotations: what the dataset provides for this image, e.g. CelebA's
        ``landmarks_align`` ((5, 2) tuple in LANDMARK_ORDER) or ``bbox``.
    """

    path: str
    identity: str | None = None
    split: str | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", _frozen(self.annotations))

    def __reduce__(self):  # mappingproxy does not pickle; worker processes need records
        return (ImageRecord, (self.path, self.identity, self.split, dict(self.annotations)))


@dataclass(frozen=True)
class DatasetListing:
    """What a reader found: the records present on disk, in a stable order,
    and how many files the dataset's annotations name but the disk lacks."""

    root: str
    format: str
    records: tuple[ImageRecord, ...]
    missing: int = 0
    missing_examples: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.records)
