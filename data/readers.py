"""Dataset readers: CelebA roots, LFW, a folder per identity, a plain folder.

Each reader returns a :class:`DatasetListing` whose records are in a stable,
sorted order, so that partition ``k`` of a run always holds the same images.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from data.records import DatasetListing, ImageRecord
from facesearch.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jfif"}
)
CELEBA_SPLITS = {"0": "train", "1": "val", "2": "test"}
SPLIT_CHOICES = ("train", "val", "test", "all")


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(root: Path) -> list[Path]:
    """All image files below ``root`` (recursive, symlinks followed), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image_name(f))
    return sorted(found)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --------------------------------------------------------------------------- CelebA


def read_annotation_table(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Parse a CelebA annotation file: optional count line, optional header
    line, then ``filename value value ...`` rows. CRLF or LF endings.

    Returns (column names or [], {filename: [values...]}).
    """
    columns: list[str] = []
    rows: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", newline=None) as handle:
        for lineno, raw in enumerate(handle):
            parts = raw.split()
            if not parts:
                continue
            if lineno == 0 and len(parts) == 1 and parts[0].isdigit():
                continue  # the count line
            if not rows and not columns and not is_image_name(parts[0]):
                columns = parts  # the header line
                continue
            rows[parts[0]] = parts[1:]
    return columns, rows


def _celeba_image_dir(root: Path, images: str) -> tuple[Path, str]:
    choices = {"align": "img_align_celeba", "wild": "img_celeba"}
    if images in choices:
        folder = root / choices[images]
        if not folder.is_dir():
            raise DatasetError(f"{root} has no {choices[images]}/ folder")
        return folder, images
    if images != "auto":
        raise DatasetError(f"unknown CelebA image set {images!r}: choose auto, align or wild")
    for kind in ("align", "wild"):
        folder = root / choices[kind]
        if folder.is_dir():
            return folder, kind
    raise DatasetError(f"{root} is not a CelebA root: it has neither img_align_celeba/ nor img_celeba/")


def _find_file(root: Path, *candidates: str) -> Path | None:
    for candidate in candidates:
        if (root / candidate).is_file():
            return root / candidate
    return None


def _points(values: list[str]) -> tuple[tuple[float, float], ...]:
    nums = [float(v) for v in values]
    return tuple((nums[i], nums[i + 1]) for i in range(0, len(nums), 2))


def read_celeba(root: str | os.PathLike[str], split: str = "all", images: str = "auto") -> DatasetListing:
    """Read a CelebA root.

    split: train, val, test or all (from Eval/list_eval_partition.txt).
    images: auto (aligned if present, else in-the-wild), align or wild.
    Files named in the annotations but absent on disk are counted in
    ``missing`` and logged once; they are not an error.
    """
    root_path = Path(root)
    if split not in SPLIT_CHOICES:
        raise DatasetError(f"unknown split {split!r}: choose one of {', '.join(SPLIT_CHOICES)}")
    image_dir, kind = _celeba_image_dir(root_path, images)
    identity_file = _find_file(root_path, "Anno/identity_CelebA.txt", "identity_CelebA.txt")
    partition_file = _find_file(root_path, "Eval/list_eval_partition.txt", "list_eval_partition.txt")
    if identity_file is None:
        raise DatasetError(f"{root_path} has no Anno/identity_CelebA.txt")
    if partition_file is None and split != "all":
        raise DatasetError(f"{root_path} has no Eval/list_eval_partition.txt, needed for split={split}")

    _, identities = read_annotation_table(identity_file)
    partitions = read_annotation_table(partition_file)[1] if partition_file else {}

    extra: dict[str, dict[str, list[str]]] = {}
    if kind == "align":
        optional = {"landmarks": "list_landmarks_align_celeba.txt"}
    else:
        optional = {"landmarks": "list_landmarks_celeba.txt", "bbox": "list_bbox_celeba.txt"}
    for key, name in optional.items():
        found = _find_file(root_path, f"Anno/{name}", name)
        if found is not None:
            extra[key] = read_annotation_table(found)[1]

    on_disk = {entry.name for entry in os.scandir(image_dir) if entry.is_file()}
    records: list[ImageRecord] = []
    missing: list[str] = []
    for filename in sorted(identities):
        split_name = CELEBA_SPLITS.get(partitions[filename][0]) if filename in partitions else None
        if split != "all" and split_name != split:
            continue
        if filename not in on_disk:
            missing.append(filename)
            continue
        annotations: dict[str, object] = {}
        if filename in extra.get("landmarks", {}):
            annotations["landmarks"] = _points(extra["landmarks"][filename])
        if filename in extra.get("bbox", {}):
            x, y, w, h = (float(v) for v in extra["bbox"][filename])
            annotations["bbox"] = (x, y, x + w, y + h)
        records.append(
            ImageRecord(
                path=f"{image_dir.name}/{filename}",
                identity=identities[filename][0],
                split=split_name,
                annotations=annotations,
            )
        )
    unlabelled = len(on_disk - set(identities))
    if missing:
        log.warning(
            "CelebA root %s: %d of %d annotated images (split=%s) are missing on disk, e.g. %s; "
            "indexing the %d present",
            root_path, len(missing), len(missing) + len(records), split, missing[0], len(records),
        )
    if unlabelled:
        log.info("CelebA root %s: %d files in %s/ have no identity and are skipped", root_path, unlabelled, image_dir.name)
    return DatasetListing(
        root=str(root_path), format="celeba", records=tuple(records),
        missing=len(missing), missing_examples=tuple(missing[:5]),
    )


# --------------------------------------------------------------------------- LFW


def lfw_image_dir(root: Path) -> Path:
    """The folder holding LFW's ``<Name>/`` folders: root/lfw, root/lfw-deepfunneled or root."""
    for candidate in (root / "lfw", root / "lfw-deepfunneled", root / "lfw_funneled", root):
        if candidate.is_dir() and any(
            entry.is_dir() and (candidate / entry.name / f"{entry.name}_0001.jpg").is_file()
            for entry in os.scandir(candidate)
        ):
            return candidate
    raise DatasetError(f"{root} is not an LFW root: no <Name>/<Name>_0001.jpg folders found")


def read_lfw(root: str | os.PathLike[str]) -> DatasetListing:
    """Read LFW (``<Name>/<Name>_NNNN.jpg``); identity is the name."""
    root_path = Path(root)
    image_dir = lfw_image_dir(root_path)
    records = []
    for person in sorted(entry.name for entry in os.scandir(image_dir) if entry.is_dir()):
        for path in walk_images(image_dir / person):
            records.append(ImageRecord(path=_rel(path, root_path), identity=person))
    return DatasetListing(root=str(root_path), format="lfw", records=tuple(records))


def lfw_pair_path(name: str, number: int) -> str:
    """Path of LFW image ``number`` of ``name``, relative to the image folder."""
    return f"{name}/{name}_{number:04d}.jpg"


# --------------------------------------------------------------------------- folders


def read_folders(root: str | os.PathLike[str]) -> DatasetListing:
    """A folder per identity: ``root/<identity>/**/<image>``."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatasetError(f"{root_path} is not a folder")
    records = []
    for person in sorted(e.name for e in os.scandir(root_path) if e.is_dir() and not e.name.startswith(".")):
        for path in walk_images(root_path / person):
            records.append(ImageRecord(path=_rel(path, root_path), identity=person))
    loose = [e.name for e in os.scandir(root_path) if e.is_file() and is_image_name(e.name)]
    if loose:
        log.warning("%d images directly in %s have no identity folder and are skipped", len(loose), root_path)
    return DatasetListing(root=str(root_path), format="folders", records=tuple(records))


def read_folder(root: str | os.PathLike[str]) -> DatasetListing:
    """A plain folder, searched recursively; identity None."""
    root_path = Path(root)
    if root_path.is_file():
        raise DatasetError(f"{root_path} is a file; give the folder that holds the images")
    if not root_path.is_dir():
        raise DatasetError(f"{root_path} is not a folder")
    records = tuple(ImageRecord(path=_rel(p, root_path)) for p in walk_images(root_path))
    return DatasetListing(root=str(root_path), format="folder", records=records)


FORMATS: dict[str, Callable[..., DatasetListing]] = {
    "celeba": read_celeba,
    "lfw": read_lfw,
    "folders": read_folders,
    "folder": read_folder,
}


def read_dataset(root: str | os.PathLike[str], format: str, split: str = "all") -> DatasetListing:
    """Read a dataset root in one of :data:`FORMATS`.

    split: only CelebA has official splits; other formats accept "all" only.
    """
    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}: choose one of {', '.join(FORMATS)}")
    if not Path(root).exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if format == "celeba":
        return read_celeba(root, split=split)
    if split != "all":
        raise DatasetError(f"format {format} has no splits; use --split all")
    return FORMATS[format](root)
