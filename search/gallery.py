"""A gallery directory loaded for search: manifest metadata + FAISS index."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer.build import GALLERY_FILE, INDEX_FILE, apply_index_settings
from indexer.writer import manifest_parts
from search.calibration import Calibration, CalibrationError, gallery_calibration

#: Manifest columns kept in memory for answering queries (embeddings stay on disk).
META_COLUMNS = ["face_id", "path", "identity", "split", "face_index", "box", "score"]


class GalleryError(Exception):
    """A gallery directory that cannot be searched, and why."""


@dataclass(frozen=True, eq=False)
class Gallery:
    """An index and the manifest rows its ids point to (id = row number)."""

    directory: Path
    info: dict[str, Any]
    index: Any
    meta: pa.Table

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Gallery":
        """Load and check a gallery: the index must hold one vector per
        manifest row, of the dimension gallery.json states."""
        import faiss

        path = Path(directory)
        info_path = path / GALLERY_FILE
        if not info_path.is_file():
            hint = " (an index run is unfinished: rerun face-index run, or face-index build)" if (path / "run.json").exists() else ""
            raise GalleryError(f"{path} is not a gallery: {GALLERY_FILE} is missing{hint}")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise GalleryError(f"{info_path} is unreadable: {err}") from err
        if not (path / INDEX_FILE).is_file():
            raise GalleryError(f"{path} has no {INDEX_FILE}: run face-index build {path}")
        try:
            index = faiss.read_index(str(path / INDEX_FILE))
        except RuntimeError as err:
            raise GalleryError(f"{path / INDEX_FILE} is not a readable FAISS index: {err}") from err
        apply_index_settings(index, info.get("index", {}))
        parts = manifest_parts(path)
        if not parts:
            raise GalleryError(f"{path} has no manifest partitions")
        try:
            meta = pa.concat_tables([pq.read_table(p, columns=META_COLUMNS) for p in parts])
        except (OSError, pa.ArrowInvalid) as err:
            raise GalleryError(f"{path}: manifest unreadable: {err}") from err
        dim = int(info.get("embedding_dim", -1))
        if index.d != dim:
            raise GalleryError(f"{path}: the index is {index.d}-D but gallery.json says {dim}-D; rebuild with face-index build")
        if index.ntotal != meta.num_rows:
            raise GalleryError(
                f"{path}: the index holds {index.ntotal} vectors but the manifest {meta.num_rows} rows; "
                "rebuild with face-index build"
            )
        ids = meta.column("face_id").to_numpy()
        if not np.array_equal(ids, np.arange(len(ids))):
            raise GalleryError(f"{path}: manifest face ids are not 0..N-1 in order; rebuild with face-index build")
        try:
            gallery_calibration(info)
        except CalibrationError as err:
            raise GalleryError(f"{info_path}: {err}") from err
        return cls(directory=path, info=info, index=index, meta=meta.combine_chunks())

    def __len__(self) -> int:
        return self.meta.num_rows

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def dataset_root(self) -> str | None:
        return self.info.get("dataset", {}).get("root")

    @property
    def calibration(self) -> Calibration | None:
        """Thresholds from ``face-search eval``, or None when uncalibrated."""
        return gallery_calibration(self.info)

    def image_path(self, relative: str) -> Path | None:
        """The image of a manifest path under the dataset root recorded in gallery.json (None if none is recorded)."""
        root = self.dataset_root
        return None if root is None else Path(root) / relative

    def row(self, face_id: int) -> dict[str, Any]:
        if not 0 <= face_id < len(self):
            raise KeyError(f"face id {face_id} is not in this gallery of {len(self)} faces")
        return {name: self.meta.column(name)[face_id].as_py() for name in META_COLUMNS}

    def read_columns(self, columns: list[str]) -> pa.Table:
        """Manifest columns for all faces, in face-id order (read from disk)."""
        return pa.concat_tables([pq.read_table(p, columns=columns) for p in manifest_parts(self.directory)]).combine_chunks()

    def embeddings(self) -> np.ndarray:
        """All embeddings (N, dim) float32, in face-id order, read from the manifest."""
        column = self.read_columns(["embedding"]).column("embedding").combine_chunks()
        return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, self.dim)
