"""The gallery format, in one place: directory layout, Arrow schemas, gallery.json.

A gallery directory::

    GALLERY/
      run.json                  resolved settings of the index run (RunConfig)
      pipeline.json             the run's pipeline: backends, versions, settings (so building needs no models)
      gallery.json              GalleryInfo: the pipeline, the index, the files of the
                                current generation, counts, calibration. Replacing it
                                (write, fsync, rename) is the commit point of every change.
      manifest/*.parquet        one row per face (MANIFEST columns)
      failures/*.parquet        one row per image that gave no face (FAILURE columns)
      index-GGGGGG.faiss        the FAISS index of generation G (format 1: index.faiss)
      enrolled/                 images added from outside the dataset (face-index add, POST /v1/faces)
      eval/, audit.html         derived pages and figures (deleted when faces are removed)
      changes.log               one JSON line per change: when, what, how many (never who)
      .lock                     the writer lock (flock), with its holder

While ``face-index run`` works, ``manifest/part-NNNNN.parquet`` files appear one per
finished partition. From the first build on, gallery.json lists the files that make
up the gallery; files it does not list are leftovers of an interrupted change and
are deleted by the next writer.

Format versions: 1 (before lifecycle changes: face id = manifest row, index.faiss,
parts found by glob) still opens; 2 lists its files and maps stable face ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facesearch.errors import GalleryError

RUN_FILE = "run.json"
PIPELINE_FILE = "pipeline.json"
GALLERY_FILE = "gallery.json"
LEGACY_INDEX_FILE = "index.faiss"
MANIFEST_DIR = "manifest"
FAILURES_DIR = "failures"
ENROLLED_DIR = "enrolled"
EVAL_DIR = "eval"
AUDIT_FILE = "audit.html"
CHANGES_LOG = "changes.log"
LOCK_FILE = ".lock"
FORMAT_VERSION = 2
SUPPORTED_FORMATS = (1, 2)


class FailureKind(str, Enum):
    """Why an image gave no face row; stored as the failures' ``kind`` column."""

    NO_FACE = "no_face"
    LOAD_ERROR = "load_error"
    DETECT_ERROR = "detect_error"
    EMBED_ERROR = "embed_error"

    @classmethod
    def of_stage(cls, stage: str) -> "FailureKind":
        return cls(f"{stage}_error")


# --- Arrow schemas -----------------------------------------------------------------

def manifest_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("face_id", pa.int64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("identity", pa.string()),
            pa.field("split", pa.string()),
            pa.field("face_index", pa.int32(), nullable=False),
            pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
            pa.field("score", pa.float32(), nullable=False),
            pa.field("landmarks", pa.list_(pa.float32(), 10), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("content_hash", pa.string()),
        ],
        metadata={
            b"landmarks": b"x,y of left_eye, right_eye, nose, mouth_left, mouth_right (as seen in the image)",
            b"box": b"x1,y1,x2,y2 in pixels",
            b"embedding": b"L2-normalised float32; cosine similarity = dot product",
            b"content_hash": b"sha256 of the image file's bytes (null in galleries of format 1)",
        },
    )


FAILURE_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("identity", pa.string()),
        pa.field("split", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("content_hash", pa.string()),
    ]
)

#: manifest columns a searching process keeps in memory (embeddings stay on disk)
META_COLUMNS = ("face_id", "path", "identity", "split", "face_index", "box", "score")


def failure_kinds(table: pa.Table) -> list[str]:
    """The ``kind`` of each failure row; format-1 parts have no such column, so it is
    derived from their stage the one time it can be (``no face found`` was the only
    detect-stage reason then)."""
    if "kind" in table.column_names:
        return table.column("kind").to_pylist()
    return [FailureKind.NO_FACE.value if reason == "no face found" else FailureKind.of_stage(stage).value
            for stage, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist())]


def fixed_list(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width)


def embeddings_of(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as an (N, dim) float32 array."""
    column = table.column("embedding")
    dim = column.type.list_size
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0, np.float32)
    return np.asarray(flat, np.float32).reshape(-1, dim)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in order; columns a format-1 part lacks are null
    (``kind`` is derived). Used when a change rewrites an old part."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        elif f.name == "kind":
            columns.append(pa.array(failure_kinds(table), pa.string()))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


# --- atomic files --------------------------------------------------------------------

def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, writer) -> None:  # noqa: ANN001 - writer(tmp_path)
    """Write via ``writer(tmp)``, fsync, then rename into place: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        writer(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def publish(tmp: Path, path: Path) -> None:
    """Make a fully written temporary file ``path``: fsync it, rename it, fsync the folder."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temporary_for(path: Path) -> Path:
    return _tmp_name(path)


class AtomicFile:
    """``with AtomicFile(path) as handle:`` streams into a temporary file that replaces ``path``
    (fsynced) only when the block ends without an error; ``checksum`` is then set."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = _tmp_name(path)
        self.checksum: str | None = None
        self._digest = hashlib.sha256()
        self._handle: Any = None

    def write(self, data: bytes | memoryview) -> None:
        self._digest.update(data)
        self._handle.write(data)

    def __enter__(self) -> "AtomicFile":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.tmp, "wb")
        return self

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            if kind is None:
                os.replace(self.tmp, self.path)
                fsync_dir(self.path.parent)
                self.checksum = "sha256:" + self._digest.hexdigest()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def write_table_atomic(table: pa.Table, path: Path) -> None:
    write_bytes_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GalleryError(f"{path} is unreadable: {err}") from err
    if not isinstance(data, dict):
        raise GalleryError(f"{path} is not a JSON object")
    return data


# --- gallery.json --------------------------------------------------------------------

@dataclass(frozen=True)
class GalleryInfo:
    """gallery.json, typed. ``to_json`` / ``from_json`` round-trip it; unknown keys are kept
    in ``extra`` so a newer writer's fields survive an older reader's rewrite.

    Adding a field: give it a default (old files lack it), then read it where it is used.
    """

    embedding_dim: int
    pipeline: Mapping[str, Any]
    index: Mapping[str, Any]
    format_version: int = FORMAT_VERSION
    generation: int = 0
    created: str = ""
    updated: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    metric: str = "cosine"
    manifest: tuple[str, ...] | None = None  # files relative to the gallery; None (format 1): manifest/part-*.parquet
    failures: tuple[str, ...] | None = None
    next_face_id: int | None = None  # ids below it are used up, even when their faces were removed
    counts: Mapping[str, Any] = field(default_factory=dict)
    dataset: Mapping[str, Any] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] | None = None
    checksums: Mapping[str, str] = field(default_factory=dict)  # file (relative) -> "sha256:<hex>"; empty in format 1
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = GALLERY_FILE) -> "GalleryInfo":
        version = data.get("format_version", 1)
        if version not in SUPPORTED_FORMATS:
            raise GalleryError(
                f"{source}: gallery format {version} is not supported by this facesearch "
                f"(it reads {', '.join(map(str, SUPPORTED_FORMATS))}); upgrade facesearch"
            )
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        try:
            info = cls(**known, extra={k: v for k, v in data.items() if k not in names})
        except TypeError as err:
            raise GalleryError(f"{source} lacks a required key: {err}") from err
        for name in ("manifest", "failures"):
            if getattr(info, name) is not None:
                object.__setattr__(info, name, tuple(getattr(info, name)))
        return info

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in ("calibration", "manifest", "failures", "next_face_id"):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "GalleryInfo":
        return replace(self, **changes)

    @property
    def index_file(self) -> str:
        return str(self.index.get("file", LEGACY_INDEX_FILE))

    @property
    def index_type(self) -> str:
        return str(self.index.get("type", "flat"))

    @property
    def pipeline_config(self) -> Mapping[str, Any] | None:
        return self.pipeline.get("config")

    @property
    def dataset_root(self) -> str | None:
        return self.dataset.get("root")


# --- the directory -----------------------------------------------------------------

class _Under:
    """A path below a GalleryLayout's root, named once: ``layout.run_file`` is ``root / "run.json"``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layout: "GalleryLayout | None", owner: type | None = None) -> Any:
        return self if layout is None else layout.root / self.name


@dataclass(frozen=True)
class GalleryLayout:
    """Paths of one gallery directory. Pure: nothing here reads or writes."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    run_file = _Under(RUN_FILE)
    info_file = _Under(GALLERY_FILE)
    manifest_dir = _Under(MANIFEST_DIR)
    failures_dir = _Under(FAILURES_DIR)
    enrolled_dir = _Under(ENROLLED_DIR)
    eval_dir = _Under(EVAL_DIR)
    audit_file = _Under(AUDIT_FILE)
    changes_log = _Under(CHANGES_LOG)
    lock_file = _Under(LOCK_FILE)

    def partition_file(self, folder: str, name: str) -> Path:
        return self.root / folder / f"{name}.parquet"

    def part_files(self, folder: str) -> list[Path]:
        """The ``part-NNNNN`` files an index run wrote (before the first build lists them)."""
        return sorted((self.root / folder).glob("part-*.parquet"))

    def index_path(self, info: GalleryInfo) -> Path:
        return self.root / info.index_file

    def manifest_files(self, info: GalleryInfo | None) -> list[Path]:
        if info is None or info.manifest is None:
            return self.part_files(MANIFEST_DIR)
        return [self.root / name for name in info.manifest]

    def failure_files(self, info: GalleryInfo | None) -> list[Path]:
        if info is None or info.failures is None:
            return self.part_files(FAILURES_DIR)
        return [self.root / name for name in info.failures]

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def read_info(self) -> GalleryInfo:
        """gallery.json; GalleryError when it is missing or malformed."""
        try:
            data = read_json(self.info_file)
        except FileNotFoundError:
            hint = (" (an index run is unfinished: rerun face-index run, or face-index build)"
                    if self.run_file.exists() else "")
            raise GalleryError(f"{self.root} is not a gallery: {GALLERY_FILE} is missing{hint}") from None
        return GalleryInfo.from_json(data, str(self.info_file))

    def clean_temporaries(self) -> int:
        """Remove temporary files an interrupted writer left behind."""
        removed = 0
        for folder in (self.manifest_dir, self.failures_dir, self.enrolled_dir, self.root):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp-*"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
        return removed


class GalleryCorruptError(GalleryError):
    """A gallery file whose bytes are not those its generation recorded."""


def file_checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _corrupt(layout: "GalleryLayout", path: Path) -> GalleryCorruptError:
    repair = (f"face-index build {layout.root} rebuilds it from the manifest" if path.suffix != ".parquet" else
              f"restore it from a backup, or run face-index build --drop-missing {layout.root} "
              f"and then face-index sync {layout.root} to re-add its images")
    return GalleryCorruptError(f"{path} is corrupt (its checksum differs from the one in {GALLERY_FILE}): {repair}")


def verify_file(layout: "GalleryLayout", info: GalleryInfo | None, path: Path) -> None:
    """Check a (large) gallery file against its recorded checksum, reading it in chunks."""
    expected = info.checksums.get(layout.relative(path)) if info is not None else None
    if expected is None:
        if not path.is_file():
            raise FileNotFoundError(2, "missing", str(path))
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    if "sha256:" + digest.hexdigest() != expected:
        raise _corrupt(layout, path)


def read_verified(layout: "GalleryLayout", info: GalleryInfo | None, path: Path) -> bytes:
    """A gallery file's bytes, checked against the checksum gallery.json records for it
    (format-1 files have none). FileNotFoundError when it is gone; GalleryCorruptError
    naming the file and the repair when its bytes changed."""
    data = path.read_bytes()
    name = layout.relative(path)
    expected = info.checksums.get(name) if info is not None else None
    if expected is not None and file_checksum(data) != expected:
        raise _corrupt(layout, path)
    return data


def row_count(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def read_tables(paths: Sequence[Path], columns: Iterable[str] | None = None) -> pa.Table | None:
    """The parts concatenated (None when there are none). A missing part raises FileNotFoundError."""
    wanted = list(columns) if columns is not None else None
    tables = []
    for p in paths:
        part = pq.ParquetFile(p)
        present = part.schema_arrow.names
        tables.append(part.read(columns=None if wanted is None else [c for c in wanted if c in present]))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default").combine_chunks()
