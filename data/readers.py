"""Dataset readers: CelebA roots, LFW, a folder per identity, a plain folder.

Each reader returns a :class:`DatasetListing` whose records are in a stable,
sorted order, so that partition ``k`` of a run always holds the same images.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Callable, NamedTuple

from data.records import (
    LOAD_ERROR, SKIP_DUPLICATE, SKIP_HIDDEN, SKIP_LOOP, SKIP_NAME_CLASH, SKIP_NO_IDENTITY, SKIP_NOT_IMAGE,
    SKIP_NOT_REGULAR, SKIP_SAME_FOLDER, SKIP_UNREADABLE, DatasetListing, ImageRecord, Skipped,
)
from facesearch.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jfif",
     ".heic", ".heif", ".avif"}
)
CELEBA_SPLITS = {"0": "train", "1": "val", "2": "test"}
SPLIT_CHOICES = ("train", "val", "test", "all")


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower() or "none"


# --------------------------------------------------------------------------- file names


def display_path(path: str) -> str:
    """``path`` as valid UTF-8. A name that is not UTF-8 reaches Python with surrogate
    escapes (os.fsdecode); its undecodable bytes become ``\\xNN`` here: the same text on
    every run, so resume and sync see the same path, and Parquet can store it."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        pass
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file system name gives; never lose the rest
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def not_utf8_reason(rel: str) -> str:
    """Why a record whose path is not UTF-8 cannot be indexed as it is named."""
    what = "file" if display_path(os.path.basename(rel)) != os.path.basename(rel) else "folder"
    return f"{what} name is not valid UTF-8 (shown with \\x escapes); rename the {what}"


class Tree(NamedTuple):
    """What :func:`scan_tree` found, paths relative to the root as POSIX strings: the image
    files (each real file once, sorted), the paths not listed (``Skipped``, with a reason),
    and the listed files known not to open (broken symlinks), with why."""

    files: list[str]
    skipped: list[Skipped]
    unopenable: dict[str, str]


def _path_key(rel: str) -> tuple[str, ...]:
    """Sort key of a relative path: component by component, as pathlib orders paths."""
    return tuple(rel.split("/"))


def _listing(
    tree: Tree, root: Path, format: str, identity_of: Callable[[tuple[str, ...]], str | None],
) -> DatasetListing:
    """The listing of ``tree``. A path that is not valid UTF-8 gets its escaped display form
    and a LOAD_ERROR annotation, and so does a broken symlink: the indexer records a load
    failure that says why (and to rename the file), and the run goes on."""
    records: list[ImageRecord] = []
    skipped = list(tree.skipped)
    taken = set(tree.files)
    renamed = False
    for rel in tree.files:
        shown = display_path(rel)
        identity = identity_of(_path_key(rel))
        identity = display_path(identity) if identity is not None else None
        problem = tree.unopenable.get(rel)
        if shown != rel:
            if shown in taken:
                skipped.append(Skipped(shown, SKIP_NAME_CLASH, "another file has this name"))
                continue
            problem, renamed = not_utf8_reason(rel), True
        records.append(ImageRecord(path=shown, identity=identity, annotations={LOAD_ERROR: problem} if problem else {}))
    if renamed:  # escaped names may sort elsewhere; the listing is sorted by the paths it gives
        records.sort(key=lambda r: _path_key(r.path))
    skipped.sort(key=lambda s: _path_key(s.path))
    return DatasetListing(root=str(root), format=format, records=tuple(records), skipped=tuple(skipped))


# --------------------------------------------------------------------------- walking


def scan_tree(top: Path, root: Path, by_identity: bool = False) -> Tree:
    """The image files below ``top`` (recursive, symlinks followed), each real file once,
    sorted; and every other path it saw, with the reason it is not listed. Paths are
    relative to ``root`` (``top`` or a folder above it).

    - A folder reached again through a symlink to one of its own ancestors is a loop: it is
      not entered, is logged as a warning and skipped. A folder reached twice otherwise
      (two symlinks to one folder) is listed the first time, in sorted order.
    - A file reached through several paths (symlinks, hard links: one (st_dev, st_ino)) is
      listed once, under its first path in sorted order. With ``by_identity`` (one folder
      per identity below ``top``), the same file under two identity folders is two labels
      and is listed under each; images directly in ``top`` have no identity and are skipped.
    - Hidden names (``.*``), unlisted extensions, fifos and sockets, unreadable folders are
      skipped, each with its reason.
    - A broken symlink with an image name is listed, in ``unopenable`` with the reason.
    """
    prefix = Path(top).relative_to(root).parts

    def shown(parts: tuple[str, ...]) -> str:
        return display_path("/".join(prefix + parts) or ".")

    try:
        top_stat = os.stat(top)
    except OSError as err:
        raise DatasetError(f"cannot read {display_path(str(top))}: {err.strerror or err}") from err
    skipped: list[Skipped] = []
    files: list[tuple[tuple[str, ...], tuple | None]] = []
    unopenable: dict[str, str] = {}
    visited: dict[tuple, tuple[str, ...]] = {}
    # Depth-first, children in name order: folders are visited in the sorted order of their
    # paths, so "first" means first in sorted order. Items: (folder, its parts below top,
    # its (st_dev, st_ino), its ancestors' keys).
    stack: list[tuple[str, tuple[str, ...], tuple, tuple[tuple, ...]]] = [
        (os.fspath(top), (), _identity(top_stat, ()), ()),
    ]
    while stack:
        folder, parts, key, ancestors = stack.pop()
        group = parts[0] if by_identity and parts else None
        if key in ancestors:
            log.warning("symlink loop at %s: it leads back to a folder above it; not followed", display_path(folder))
            skipped.append(Skipped(shown(parts), SKIP_LOOP, "leads back to a folder above it"))
            continue
        if (group, key) in visited:
            skipped.append(Skipped(shown(parts), SKIP_SAME_FOLDER, shown(visited[(group, key)])))
            continue
        visited[(group, key)] = parts
        try:
            with os.scandir(folder) as found:
                entries = sorted(found, key=lambda e: e.name)
        except OSError as err:
            if not parts:
                raise DatasetError(f"cannot read {display_path(folder)}: {err.strerror or err}") from err
            log.warning("cannot read folder %s (%s): its images are not listed", display_path(folder),
                        err.strerror or err)
            skipped.append(Skipped(shown(parts), SKIP_UNREADABLE, err.strerror or str(err)))
            continue
        subfolders = []
        for entry in entries:
            name = entry.name
            here = parts + (name,)
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if name.startswith("."):
                skipped.append(Skipped(shown(here), SKIP_HIDDEN, "folder" if is_dir else "file"))
                continue
            if is_dir:
                try:
                    info = entry.stat()
                except OSError as err:
                    skipped.append(Skipped(shown(here), SKIP_UNREADABLE, err.strerror or str(err)))
                    continue
                subfolders.append((entry.path, here, _identity(info, here), ancestors + (key,)))
                continue
            if not is_image_name(name):
                skipped.append(Skipped(shown(here), SKIP_NOT_IMAGE, _extension(name)))
                continue
            try:
                info = entry.stat()
            except OSError as err:  # a broken symlink: listed, and its load failure says why
                unopenable["/".join(prefix + here)] = _broken_link_reason(entry.path, err)
                files.append((here, None))
                continue
            if not stat.S_ISREG(info.st_mode):
                skipped.append(Skipped(shown(here), SKIP_NOT_REGULAR, "not a regular file"))
                continue
            if by_identity and not parts:
                skipped.append(Skipped(shown(here), SKIP_NO_IDENTITY, "not in an identity folder"))
                continue
            files.append((here, (group, _identity(info, here))))
        stack.extend(reversed(subfolders))
    files.sort(key=lambda item: item[0])
    first: dict[tuple, tuple[str, ...]] = {}
    kept: list[str] = []
    for parts, file_key in files:
        if file_key is not None:
            if file_key in first:
                skipped.append(Skipped(shown(parts), SKIP_DUPLICATE, shown(first[file_key])))
                continue
            first[file_key] = parts
        kept.append("/".join(prefix + parts))
    return Tree(kept, skipped, unopenable)


def _identity(info: os.stat_result, parts: tuple[str, ...]) -> tuple:
    """What makes a file or folder the same one whatever the path: (st_dev, st_ino). A file
    system without inode numbers (st_ino 0) cannot tell: there the path is the identity."""
    return (info.st_dev, info.st_ino) if info.st_ino else ("path", parts)


def _broken_link_reason(path: str, err: OSError) -> str:
    try:
        target = display_path(os.readlink(path))
    except OSError:
        return f"cannot read file: {err.strerror or err}"
    return f"broken symlink to {target} ({err.strerror or err})"


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
    unlabelled = sorted(on_disk - set(identities))
    if missing:
        log.warning(
            "CelebA root %s: %d of %d annotated images (split=%s) are missing on disk, e.g. %s; "
            "indexing the %d present",
            root_path, len(missing), len(missing) + len(records), split, missing[0], len(records),
        )
    skipped = tuple(
        Skipped(display_path(f"{image_dir.name}/{name}"), SKIP_NO_IDENTITY, f"not in {identity_file.name}")
        for name in unlabelled
    )
    return DatasetListing(
        root=str(root_path), format="celeba", records=tuple(records),
        missing=len(missing), missing_examples=tuple(missing[:5]), skipped=skipped,
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
    depth = len(image_dir.relative_to(root_path).parts)
    tree = scan_tree(image_dir, root_path, by_identity=True)
    return _listing(tree, root_path, "lfw", lambda parts: parts[depth])


def lfw_pair_path(name: str, number: int) -> str:
    """Path of LFW image ``number`` of ``name``, relative to the image folder."""
    return f"{name}/{name}_{number:04d}.jpg"


# --------------------------------------------------------------------------- folders


def read_folders(root: str | os.PathLike[str]) -> DatasetListing:
    """A folder per identity: ``root/<identity>/**/<image>``."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatasetError(f"{root_path} is not a folder")
    listing = _listing(scan_tree(root_path, root_path, by_identity=True), root_path, "folders", lambda parts: parts[0])
    loose = sum(1 for s in listing.skipped if s.reason == SKIP_NO_IDENTITY)
    if loose:
        log.warning("%d images directly in %s have no identity folder and are skipped", loose, root_path)
    return listing


def read_folder(root: str | os.PathLike[str]) -> DatasetListing:
    """A plain folder, searched recursively; identity None."""
    root_path = Path(root)
    if root_path.is_file():
        raise DatasetError(f"{root_path} is a file; give the folder that holds the images")
    if not root_path.is_dir():
        raise DatasetError(f"{root_path} is not a folder")
    return _listing(scan_tree(root_path, root_path), root_path, "folder", lambda parts: None)


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
