"""Writer: face rows and failure records as Parquet tables, written atomically.

An index run writes one partition as ``failures/part-NNNNN.parquet`` and then
``manifest/part-NNNNN.parquet``; the manifest file's presence marks the
partition complete, so an interrupted run leaves no half partition behind.
Schemas and paths come from :mod:`indexer.layout`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from indexer.layout import FAILURE_SCHEMA, FAILURES_DIR, MANIFEST_DIR, GalleryLayout, fixed_list, manifest_schema, write_table_atomic
from indexer.mapper import Failure, FaceRow


def face_table(rows: Sequence[FaceRow], face_ids: np.ndarray | int, dim: int) -> pa.Table:
    """Manifest rows; ``face_ids``: one id per row, or the first of consecutive ids."""
    n = len(rows)
    ids = np.arange(face_ids, face_ids + n, dtype=np.int64) if isinstance(face_ids, (int, np.integer)) else np.asarray(face_ids, np.int64)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} face ids for {n} rows")
    embeddings = np.stack([r.embedding for r in rows]) if n else np.zeros((0, dim), np.float32)
    if embeddings.shape[1] != dim:
        raise ValueError(f"embedding dimension {embeddings.shape[1]} differs from the gallery's {dim}")
    columns = {
        "face_id": pa.array(ids),
        "path": pa.array([r.path for r in rows], pa.string()),
        "identity": pa.array([r.identity for r in rows], pa.string()),
        "split": pa.array([r.split for r in rows], pa.string()),
        "face_index": pa.array([r.face_index for r in rows], pa.int32()),
        "box": fixed_list(np.array([r.box for r in rows], np.float32).reshape(n, 4), 4),
        "score": pa.array([r.score for r in rows], pa.float32()),
        "landmarks": fixed_list(np.array([r.landmarks for r in rows], np.float32).reshape(n, 10), 10),
        "embedding": fixed_list(embeddings, dim),
        "width": pa.array([r.width for r in rows], pa.int32()),
        "height": pa.array([r.height for r in rows], pa.int32()),
        "content_hash": pa.array([r.content_hash for r in rows], pa.string()),
    }
    return pa.Table.from_pydict(columns, schema=manifest_schema(dim))


def failure_table(failures: Sequence[Failure]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"path": f.path, "identity": f.identity, "split": f.split, "stage": f.stage, "kind": f.kind,
          "reason": f.reason, "content_hash": f.content_hash} for f in failures],
        schema=FAILURE_SCHEMA,
    )


def write_partition(
    gallery_dir: Path, name: str, rows: Sequence[FaceRow], failures: Sequence[Failure], first_face_id: int, dim: int
) -> None:
    """Write failures, then the manifest partition (its presence marks completion)."""
    layout = GalleryLayout(gallery_dir)
    write_table_atomic(failure_table(failures), layout.partition_file(FAILURES_DIR, name))
    write_table_atomic(face_table(rows, first_face_id, dim), layout.partition_file(MANIFEST_DIR, name))
