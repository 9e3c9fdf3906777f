"""Writer: one Parquet partition of face rows and one of failures, atomically.

A partition is complete when ``manifest/part-NNNNN.parquet`` exists: it is
written to a temporary name and renamed only after its failures file, so an
interrupted run leaves no half partition behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.mapper import Failure, FaceRow

MANIFEST_DIR = "manifest"
FAILURES_DIR = "failures"


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
        ],
        metadata={
            b"landmarks": b"x,y of left_eye, right_eye, nose, mouth_left, mouth_right (as seen in the image)",
            b"box": b"x1,y1,x2,y2 in pixels",
            b"embedding": b"L2-normalised float32; cosine similarity = dot product",
        },
    )


FAILURE_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("identity", pa.string()),
        pa.field("split", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


def _fixed(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width)


def face_table(rows: Sequence[FaceRow], first_face_id: int, dim: int) -> pa.Table:
    n = len(rows)
    embeddings = np.stack([r.embedding for r in rows]) if n else np.zeros((0, dim), np.float32)
    if embeddings.shape[1] != dim:
        raise ValueError(f"embedding dimension {embeddings.shape[1]} differs from the gallery's {dim}")
    columns = {
        "face_id": pa.array(np.arange(first_face_id, first_face_id + n, dtype=np.int64)),
        "path": pa.array([r.path for r in rows], pa.string()),
        "identity": pa.array([r.identity for r in rows], pa.string()),
        "split": pa.array([r.split for r in rows], pa.string()),
        "face_index": pa.array([r.face_index for r in rows], pa.int32()),
        "box": _fixed(np.array([r.box for r in rows], np.float32).reshape(n, 4), 4),
        "score": pa.array([r.score for r in rows], pa.float32()),
        "landmarks": _fixed(np.array([r.landmarks for r in rows], np.float32).reshape(n, 10), 10),
        "embedding": _fixed(embeddings, dim),
        "width": pa.array([r.width for r in rows], pa.int32()),
        "height": pa.array([r.height for r in rows], pa.int32()),
    }
    return pa.Table.from_pydict(columns, schema=manifest_schema(dim))


def failure_table(failures: Sequence[Failure]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"path": f.path, "identity": f.identity, "split": f.split, "stage": f.stage, "reason": f.reason} for f in failures],
        schema=FAILURE_SCHEMA,
    )


def write_table_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_partition(
    gallery_dir: Path, name: str, rows: Sequence[FaceRow], failures: Sequence[Failure], first_face_id: int, dim: int
) -> None:
    """Write failures, then the manifest partition (its presence marks completion)."""
    write_table_atomic(failure_table(failures), gallery_dir / FAILURES_DIR / f"{name}.parquet")
    write_table_atomic(face_table(rows, first_face_id, dim), gallery_dir / MANIFEST_DIR / f"{name}.parquet")


def manifest_parts(gallery_dir: Path) -> list[Path]:
    return sorted((gallery_dir / MANIFEST_DIR).glob("part-*.parquet"))


def failure_parts(gallery_dir: Path) -> list[Path]:
    return sorted((gallery_dir / FAILURES_DIR).glob("part-*.parquet"))


def row_count(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def clean_temporaries(gallery_dir: Path) -> int:
    """Remove temporary files an interrupted run left behind."""
    removed = 0
    for folder in (gallery_dir / MANIFEST_DIR, gallery_dir / FAILURES_DIR, gallery_dir):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed
