"""A gallery directory loaded for search: manifest metadata + FAISS index.

Face ids are stable (format 2): the index answers face ids, and ``position``
maps them to rows of the in-memory metadata. In format 1 they are the row numbers.
A load reads one generation: gallery.json names its files, and if a writer
replaces them while we read, the load starts again from the new gallery.json.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facesearch.errors import GalleryError, NotFoundError
from indexer import ann
from indexer.catalog import is_external
from indexer.layout import META_COLUMNS, GalleryInfo, GalleryLayout, embeddings_of, read_tables, read_verified, verify_file
from search.calibration import Calibration, CalibrationError, gallery_calibration

log = logging.getLogger(__name__)

__all__ = ["META_COLUMNS", "Gallery", "GalleryError"]

#: how often a load restarts when a writer swaps generations under it
LOAD_ATTEMPTS = 5


def _read_meta(layout: GalleryLayout, info: GalleryInfo) -> pa.Table:
    """The metadata columns: memory-mapped from the generation's meta-G.arrow (one file, zero
    copy: opening stays fast at millions of faces), or read from the parts of older galleries."""
    if info.index.get("meta"):
        path = layout.root / str(info.index["meta"])
        verify_file(layout, info, path)
        try:
            return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except (OSError, pa.ArrowInvalid) as err:
            raise GalleryError(f"{path} is unreadable: {err}; rebuild with face-index build {layout.root}") from err
    parts = layout.manifest_files(info)
    if not parts:
        raise GalleryError(f"{layout.root} has no manifest partitions")
    tables = []
    for part in parts:
        if not part.is_file():
            raise FileNotFoundError(2, "missing", str(part))
        source = pa.BufferReader(read_verified(layout, info, part))
        try:
            tables.append(pq.read_table(source, columns=list(META_COLUMNS)))
        except (OSError, pa.ArrowInvalid) as err:
            raise GalleryError(f"{part} is unreadable: {err}") from err
    return pa.concat_tables(tables).combine_chunks()


@dataclass(frozen=True, eq=False)
class Gallery:
    """An index and the manifest rows its ids point to."""

    directory: Path
    info: GalleryInfo
    index: Any
    meta: pa.Table
    face_ids: np.ndarray  # sorted ascending, one per meta row
    store: ann.VectorStore | None = None  # float vectors on disk, for re-ranking compressed indexes

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "Gallery":
        """Load and check a gallery: the index must hold one vector per manifest row, of
        the dimension gallery.json states. Retries when a writer commits meanwhile."""
        layout = GalleryLayout(Path(directory))
        for attempt in range(LOAD_ATTEMPTS):
            try:
                return cls._load_once(layout)
            except FileNotFoundError as err:  # a writer removed the previous generation's files
                if attempt == LOAD_ATTEMPTS - 1:
                    repair = (f"restore it, or run face-index build --drop-missing {layout.root} and then "
                              f"face-index sync {layout.root} to re-add its images"
                              if str(err.filename).endswith(".parquet") else
                              f"face-index build {layout.root} rebuilds it from the manifest")
                    raise GalleryError(f"{err.filename} is missing: {repair}") from err
                log.debug("generation changed while loading %s; reading it again", layout.root)
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    @classmethod
    def _load_once(cls, layout: GalleryLayout) -> "Gallery":
        import faiss

        path = layout.root
        info = layout.read_info()
        index_path = layout.index_path(info)
        verify_file(layout, info, index_path)
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as err:
            if not index_path.is_file():
                raise FileNotFoundError(2, "missing", str(index_path)) from err
            raise GalleryError(f"{index_path} is not a readable FAISS index: {err}; "
                               f"face-index build {path} rebuilds it from the manifest") from err
        meta = _read_meta(layout, info)
        dim = info.embedding_dim
        if index.d != dim:
            raise GalleryError(f"{path}: the index is {index.d}-D but gallery.json says {dim}-D; rebuild with face-index build")
        if index.ntotal != meta.num_rows:
            raise GalleryError(
                f"{path}: the index holds {index.ntotal} vectors but the manifest {meta.num_rows} rows; "
                "rebuild with face-index build"
            )
        ids = meta.column("face_id").to_numpy().astype(np.int64)
        if info.format_version == 1 and not np.array_equal(ids, np.arange(len(ids))):
            raise GalleryError(f"{path}: manifest face ids are not 0..N-1 in order; rebuild with face-index build")
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise GalleryError(f"{path}: manifest face ids are not increasing; rebuild with face-index build")
        try:
            gallery_calibration(info.calibration)
        except CalibrationError as err:
            raise GalleryError(f"{layout.info_file}: {err}") from err
        store = None
        if info.index.get("vectors"):
            vectors_path = layout.root / str(info.index["vectors"])
            verify_file(layout, info, vectors_path)
            store = ann.VectorStore(vectors_path, dim)
            if len(store) != len(ids):
                raise GalleryError(f"{vectors_path} holds {len(store)} vectors for {len(ids)} faces; "
                                   f"rebuild with face-index build {path}")
        return cls(directory=path, info=info, index=index, meta=meta, face_ids=ids, store=store)

    def __len__(self) -> int:
        return self.meta.num_rows

    @property
    def search_settings(self) -> dict[str, Any]:
        """The tuned per-query settings of the index (efSearch, nprobe, rerank)."""
        return {key: self.info.index[key] for key in ("efSearch", "nprobe", "rerank") if key in self.info.index}

    @property
    def layout(self) -> GalleryLayout:
        return GalleryLayout(self.directory)

    @property
    def generation(self) -> int:
        return self.info.generation

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def dataset_root(self) -> str | None:
        return self.info.dataset_root

    @property
    def calibration(self) -> Calibration | None:
        """Thresholds from ``face-search eval``, or None when uncalibrated."""
        return gallery_calibration(self.info.calibration)

    def image_path(self, path: str) -> Path | None:
        """The image file of a manifest path: absolute paths (added from outside the dataset)
        as they are, others under the dataset root recorded in gallery.json (None if none)."""
        if is_external(path):
            return Path(path)
        root = self.dataset_root
        return None if root is None else Path(root) / path

    def positions(self, face_ids: np.ndarray) -> np.ndarray:
        """Row positions of ``face_ids`` (which must be in the gallery)."""
        return np.searchsorted(self.face_ids, np.asarray(face_ids, np.int64))

    def has(self, face_id: int) -> bool:
        i = int(np.searchsorted(self.face_ids, face_id))
        return i < len(self.face_ids) and int(self.face_ids[i]) == face_id

    def row(self, face_id: int) -> dict[str, Any]:
        if isinstance(face_id, bool) or not self.has(int(face_id)):
            raise NotFoundError(f"no face {face_id} in this gallery of {len(self)} faces")
        i = int(self.positions(np.array([face_id]))[0])
        return {name: self.meta.column(name)[i].as_py() for name in META_COLUMNS}

    def read_columns(self, columns: list[str]) -> pa.Table:
        """Manifest columns for all faces, in face-id order (read from disk)."""
        table = read_tables(self.layout.manifest_files(self.info), columns)
        assert table is not None
        return table

    def embeddings(self) -> np.ndarray:
        """All embeddings (N, dim) float32, in face-id order, read from the manifest."""
        return embeddings_of(self.read_columns(["embedding"]))
