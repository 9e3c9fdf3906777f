"""Typed records that dataset readers produce."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, NamedTuple

#: Annotation key of a record that cannot be loaded, whatever its content: the value is the
#: reason, and the indexer records a load failure without opening the file (e.g. a file name
#: that is not valid UTF-8, which no Parquet column can hold as it is).
LOAD_ERROR = "load_error"


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


class Skipped(NamedTuple):
    """A path below the dataset root that a reader saw and did not list as an image.

    path: relative to the dataset root, POSIX, valid UTF-8 (undecodable bytes as \\x escapes).
    reason: one of the ``SKIP_*`` reasons below.
    detail: what makes it so: the extension, the path listed instead, the OS error, ...
    """

    path: str
    reason: str
    detail: str = ""


SKIP_NOT_IMAGE = "not an image by extension"
SKIP_HIDDEN = "hidden"
SKIP_DUPLICATE = "same file as a listed path"
SKIP_SAME_FOLDER = "same folder as a listed path"
SKIP_LOOP = "symlink loop"
SKIP_UNREADABLE = "unreadable folder"
SKIP_NOT_REGULAR = "not a regular file"
SKIP_NO_IDENTITY = "no identity"
SKIP_NAME_CLASH = "name clash"

#: reasons that point to a problem on disk (logged as warnings), rather than a file that is simply not an image
SKIP_PROBLEMS = frozenset({SKIP_LOOP, SKIP_UNREADABLE, SKIP_NOT_REGULAR, SKIP_NAME_CLASH})

_SKIP_PHRASES = {  # (one, many)
    SKIP_NOT_IMAGE: ("not an image by extension", "not images by extension"),
    SKIP_HIDDEN: ("hidden", "hidden"),
    SKIP_DUPLICATE: ("duplicate of a listed file (symlink or hard link)",
                     "duplicates of listed files (symlinks or hard links)"),
    SKIP_SAME_FOLDER: ("folder reached twice (symlink)", "folders reached twice (symlinks)"),
    SKIP_LOOP: ("symlink loop", "symlink loops"),
    SKIP_UNREADABLE: ("unreadable folder", "unreadable folders"),
    SKIP_NOT_REGULAR: ("not a regular file (fifo, socket, device)", "not regular files (fifos, sockets, devices)"),
    SKIP_NO_IDENTITY: ("without an identity", "without an identity"),
    SKIP_NAME_CLASH: ("name not valid UTF-8 whose escaped form is another file's name",
                      "names not valid UTF-8 whose escaped forms are other files' names"),
}


def skipped_summary(skipped: Iterable[Skipped], where: str = "") -> str:
    """One line: ``skipped 3 paths [below WHERE]: 2 not images by extension (.txt, none), 1 unreadable folder``."""
    entries = list(skipped)
    counts = Counter(s.reason for s in entries)
    parts = []
    for reason, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        one, many = _SKIP_PHRASES.get(reason, (reason, reason))
        text = f"{count} {one if count == 1 else many}"
        if reason == SKIP_NOT_IMAGE:
            extensions = sorted({s.detail for s in entries if s.reason == reason})
            text += f" ({', '.join(extensions[:8])}{', ...' if len(extensions) > 8 else ''})"
        parts.append(text)
    noun = "path" if len(entries) == 1 else "paths"
    below = f" below {where}" if where else ""
    return f"skipped {len(entries)} {noun}{below}: {', '.join(parts)}" if entries else f"skipped nothing{below}"


@dataclass(frozen=True)
class DatasetListing:
    """What a reader found: the records present on disk, in a stable order,
    how many files the dataset's annotations name but the disk lacks, and what
    it saw below the root and did not list (``skipped``, sorted by path): every
    file is either a record or skipped with a reason, never silently left out."""

    root: str
    format: str
    records: tuple[ImageRecord, ...]
    missing: int = 0
    missing_examples: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()

    def __len__(self) -> int:
        return len(self.records)
