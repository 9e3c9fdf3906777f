"""A gallery that lives: add images, remove faces, sync with the dataset.

Every change is one *generation*, committed the same way:

1. under the writer lock (``indexer.lock``), leftovers of an interrupted change
   (files gallery.json does not list, temporaries) are deleted first;
2. manifest and failure parts that lose rows are rewritten under new names, new
   faces go into new parts with new face ids (ids are never reused:
   ``next_face_id`` only grows), and the index of the new generation is written;
3. pages derived from removed faces (audit.html, eval/) are deleted;
4. gallery.json is replaced (write, fsync, rename): this is the commit point.
   A SIGKILL before it leaves the previous generation, after it the new one;
5. the files of the previous generation, and enrolled images of removed faces,
   are deleted, and one line goes to changes.log (when, what, how many; never who).

Readers never lock: they read gallery.json and the files it names (see
``search.gallery.Gallery.load``, which retries if step 5 races its read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.images import file_hash, load_image_bytes
from data.readers import read_dataset, read_folder
from data.records import LOAD_ERROR, DatasetListing, ImageRecord
from embedder.pipeline import FacePipeline, PipelineConfig
from facesearch.errors import ConfigurationError, DatasetError, GalleryError, NotFoundError
from indexer.build import IndexRequest, commit_generation, now, remove_unlisted
from indexer.catalog import DatasetDiff, dataset_diff, gallery_images, is_external
from indexer.config import RunConfig
from indexer.layout import (
    FAILURE_SCHEMA, FAILURES_DIR, MANIFEST_DIR, GalleryInfo, GalleryLayout, conform, manifest_schema, read_json,
    read_verified, write_bytes_atomic, write_table_atomic,
)
from indexer.lock import WriterLock
from indexer.mapper import FaceMapper, FaceRow, Failure
from indexer.reader import read_listing
from indexer.runner import map_records
from indexer.writer import face_table, failure_table

log = logging.getLogger(__name__)

#: Fault injection for the crash tests: a process whose FACESEARCH_FAULT names one of these
#: points kills itself there with SIGKILL (a power cut, as far as the gallery can tell).
FAULT_POINTS = ("before-index", "before-commit", "after-commit")


def _fault_point(name: str) -> None:
    if os.environ.get("FACESEARCH_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class ChangeResult:
    """What one change did. ``added_face_ids``: the new faces' ids, in source order."""

    operation: str
    generation: int
    faces_added: int = 0
    faces_removed: int = 0
    images_added: int = 0
    images_removed: int = 0
    failures_added: int = 0
    added_face_ids: tuple[int, ...] = ()
    duplicates: tuple[str, ...] = ()  # sources skipped: their content is already in the gallery
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.faces_added or self.faces_removed or self.images_added or self.images_removed
                    or self.failures_added)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the writer's session ------------------------------------------------------------

@contextlib.contextmanager
def writing(gallery_dir: str | os.PathLike[str], command: str) -> Iterator[tuple[GalleryLayout, GalleryInfo]]:
    """Hold the writer lock of a built gallery and clean what an interrupted writer left."""
    layout = GalleryLayout(Path(gallery_dir))
    if not layout.info_file.exists():
        layout.read_info()  # raises the clear "not a gallery" error
    with WriterLock(layout.root, command):
        info = layout.read_info()
        layout.clean_temporaries()
        _collect_garbage(layout, info)
        yield layout, info


def _collect_garbage(layout: GalleryLayout, info: GalleryInfo) -> None:
    """Files no generation lists: left by a change killed before or after its commit."""
    removed = remove_unlisted(layout, info)
    if layout.enrolled_dir.is_dir():
        referenced = {Path(p) for p in gallery_images(layout, info) if is_external(p)}
        for path in layout.enrolled_dir.iterdir():
            if path.resolve() not in referenced and path not in referenced:
                path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.info("removed %d file(s) left by an interrupted change", len(removed))


def run_config(layout: GalleryLayout) -> RunConfig:
    return RunConfig.from_dict(read_json(layout.run_file))


def _pipeline_config(info: GalleryInfo) -> PipelineConfig:
    config = info.pipeline_config
    if config is None:
        raise GalleryError("gallery.json does not record its pipeline: rebuild the gallery with face-index run")
    return PipelineConfig.from_dict(dict(config))


# --- the commit ------------------------------------------------------------------------

@dataclass
class _Change:
    """Rows to drop and rows to add, turned into a new generation by ``_commit``."""

    drop_face_ids: set[int] = dataclasses.field(default_factory=set)
    drop_paths: set[str] = dataclasses.field(default_factory=set)  # all faces and failures of these images
    rows: list[FaceRow] = dataclasses.field(default_factory=list)
    failures: list[Failure] = dataclasses.field(default_factory=list)


def _rewrite_parts(
    layout: GalleryLayout, info: GalleryInfo, files: Sequence[str], schema: pa.Schema, folder: str, change: _Change,
) -> tuple[list[str], int, set[str]]:
    """Parts without the dropped rows: untouched parts keep their files, others are rewritten
    under the new generation's names (empty ones disappear). Returns (files, rows dropped, paths dropped)."""
    out: list[str] = []
    dropped = 0
    paths: set[str] = set()
    for n, name in enumerate(files):
        table = pq.read_table(pa.BufferReader(read_verified(layout, info, layout.root / name)))
        drop = pc.is_in(table.column("path"), pa.array(sorted(change.drop_paths), pa.string()))
        if "face_id" in table.column_names and change.drop_face_ids:
            by_id = pc.is_in(table.column("face_id"), pa.array(sorted(change.drop_face_ids), pa.int64()))
            drop = pc.or_(drop, by_id)
        count = pc.sum(drop).as_py() or 0
        if not count:
            out.append(name)
            continue
        dropped += count
        paths.update(table.filter(drop).column("path").to_pylist())
        kept = conform(table.filter(pc.invert(drop)), schema)
        if kept.num_rows:
            new_name = f"{folder}/g{info.generation + 1:06d}-r{n:05d}.parquet"
            write_table_atomic(kept, layout.root / new_name)
            out.append(new_name)
    return out, dropped, paths


def _commit(layout: GalleryLayout, info: GalleryInfo, change: _Change, operation: str) -> ChangeResult:
    generation = info.generation + 1
    manifest = list(info.manifest) if info.manifest is not None else [layout.relative(p) for p in layout.manifest_files(info)]
    failures = list(info.failures) if info.failures is not None else [layout.relative(p) for p in layout.failure_files(info)]
    if not manifest:
        raise GalleryError(f"{layout.root} has no manifest parts")
    dim = info.embedding_dim
    manifest, faces_removed, removed_face_paths = _rewrite_parts(
        layout, info, manifest, manifest_schema(dim), MANIFEST_DIR, change)
    failures, failures_removed, removed_failure_paths = _rewrite_parts(
        layout, info, failures, FAILURE_SCHEMA, FAILURES_DIR, change)
    next_id = info.next_face_id if info.next_face_id is not None else int(info.counts.get("faces", 0))
    added_ids = np.arange(next_id, next_id + len(change.rows), dtype=np.int64)
    if change.rows:
        name = f"{MANIFEST_DIR}/g{generation:06d}-a00000.parquet"
        write_table_atomic(face_table(change.rows, added_ids, dim), layout.root / name)
        manifest.append(name)
    if change.failures:
        name = f"{FAILURES_DIR}/g{generation:06d}-a00000.parquet"
        write_table_atomic(failure_table(change.failures), layout.root / name)
        failures.append(name)
    if not manifest:
        raise GalleryError(f"{operation} would leave {layout.root} without any face; a gallery needs at least one")

    _fault_point("before-index")
    removed_paths = removed_face_paths | removed_failure_paths
    if faces_removed:
        _delete_derived(layout)
    calibration = _stale_calibration(info, faces_removed)
    config = run_config(layout)
    new_info = commit_generation(
        layout, config, info, [layout.root / m for m in manifest], [layout.root / f for f in failures],
        IndexRequest.carried(info), info.counts.get("missing_from_dataset"), calibration=calibration,
        before_commit=lambda: _fault_point("before-commit"), next_face_id=next_id + len(change.rows),
    )  # gallery.json is replaced in there: committed
    _fault_point("after-commit")
    remove_unlisted(layout, new_info)
    _delete_enrolled(layout, removed_paths, new_info)
    added_paths = {r.path for r in change.rows} | {f.path for f in change.failures}
    result = ChangeResult(
        operation=operation, generation=new_info.generation, faces_added=len(change.rows), faces_removed=faces_removed,
        images_added=len(added_paths), images_removed=len(removed_paths - added_paths),
        failures_added=len(change.failures), added_face_ids=tuple(int(i) for i in added_ids),
    )
    _log_change(layout, result, failures_removed)
    return result


def _delete_derived(layout: GalleryLayout) -> None:
    """Pages and figures that could show removed faces: gone before the commit."""
    layout.audit_file.unlink(missing_ok=True)
    shutil.rmtree(layout.eval_dir, ignore_errors=True)


def _stale_calibration(info: GalleryInfo, faces_removed: int) -> dict[str, Any] | None:
    """The calibration, marked stale (since when, how many faces removed since) after a removal:
    its thresholds were measured with faces that are gone; rerun face-search eval."""
    if info.calibration is None or not faces_removed:
        return None if info.calibration is None else dict(info.calibration)
    calibration = dict(info.calibration)
    stale = dict(calibration.get("stale") or {"since": now(), "faces_removed": 0})
    stale["faces_removed"] = int(stale.get("faces_removed", 0)) + faces_removed
    calibration["stale"] = stale
    return calibration


def _delete_enrolled(layout: GalleryLayout, removed_paths: set[str], info: GalleryInfo) -> None:
    """Enrolled images (stored in the gallery) of removed faces, once no face refers to them."""
    enrolled = layout.enrolled_dir.resolve()
    candidates = [p for p in removed_paths if is_external(p) and Path(p).resolve().parent == enrolled]
    if not candidates:
        return
    still = gallery_images(layout, info)
    for path in candidates:
        if path not in still:
            Path(path).unlink(missing_ok=True)


def _log_change(layout: GalleryLayout, result: ChangeResult, failures_removed: int) -> None:
    entry = {"time": now(), "operation": result.operation, "generation": result.generation,
             "faces_added": result.faces_added, "faces_removed": result.faces_removed,
             "images_added": result.images_added, "images_removed": result.images_removed,
             "failure_records_removed": failures_removed}
    with open(layout.changes_log, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.info("%s: generation %d, %d faces added, %d removed", result.operation, result.generation,
             result.faces_added, result.faces_removed)


# --- embedding new images --------------------------------------------------------------

def _embed(layout: GalleryLayout, info: GalleryInfo, records: Sequence[ImageRecord], root: str, workers: int,
           pipeline: FacePipeline | None = None) -> _Change:
    """New rows and failures for ``records`` (paths relative to ``root``, or absolute),
    embedded with the gallery's own resolved pipeline."""
    change = _Change()
    if not records:
        return change
    config = _pipeline_config(info)
    max_pixels = run_config(layout).max_pixels
    mapper = FaceMapper(root, config, max_pixels, built=pipeline)
    if pipeline is None and workers == 0:
        pipeline = mapper.pipeline
    if pipeline is not None and pipeline.dim != info.embedding_dim:
        raise GalleryError(f"the gallery's pipeline gives {pipeline.dim}-D embeddings, the gallery holds {info.embedding_dim}-D")
    results = map_records(mapper, records, workers)
    try:
        for mapped in results:
            change.rows.extend(mapped.faces)
            if mapped.failure is not None:
                change.failures.append(mapped.failure)
    finally:
        results.close()
    return change


# --- add ----------------------------------------------------------------------------------

def collect_sources(
    sources: Sequence[str | os.PathLike[str]], dataset_root: str | None, identity: str | None = None,
    format: str | None = None,
) -> list[ImageRecord]:
    """Records for files, folders (searched recursively) or, with ``format``, datasets.
    Paths under the gallery's dataset root become relative to it (the dataset's own images,
    kept in sync by sync); others stay absolute."""
    root = Path(dataset_root).resolve() if dataset_root else None
    records: list[ImageRecord] = []
    for source in sources:
        path = Path(source).resolve()
        if not path.exists():
            raise DatasetError(f"{source} does not exist")
        if path.is_dir():
            # the dataset readers' walk: each real file once, loops and undecodable names reported
            listing = read_dataset(path, format) if format is not None else read_folder(path)
            found = [(path / r.path, r.identity, r.split, r.annotations) for r in listing.records]
        elif format is not None:
            raise DatasetError(f"--format {format} takes a dataset folder, not the file {source}")
        else:
            found = [(path, None, None, {})]
        for file, ident, split, notes in found:
            file = file if notes.get(LOAD_ERROR) else file.resolve()
            inside = root is not None and file.is_relative_to(root)
            name = file.relative_to(root).as_posix() if inside else str(file)
            records.append(ImageRecord(name, identity if identity is not None else ident, split, notes))
    return records


def add_images(
    gallery_dir: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]], identity: str | None = None,
    format: str | None = None, workers: int = 0, pipeline: FacePipeline | None = None,
) -> ChangeResult:
    """Add image files, folders or (with ``format``) datasets to a built gallery.

    identity: the person of every added face (default: from the dataset layout, or none).
    workers: processes for detection and embedding (0: this process; faster for a few images).
    Images whose content is already in the gallery are skipped and listed in ``duplicates``.
    """
    with writing(gallery_dir, "face-index add") as (layout, info):
        records = collect_sources(sources, info.dataset_root, identity, format)
        return _add_records(layout, info, records, info.dataset_root or "/", workers, pipeline, "add")


def _add_records(layout: GalleryLayout, info: GalleryInfo, records: Sequence[ImageRecord], root: str, workers: int,
                 pipeline: FacePipeline | None, operation: str) -> ChangeResult:
    held = gallery_images(layout, info)
    known = {h for h in held.values() if h is not None}
    fresh, duplicates, seen = [], [], set()
    for record in records:
        full = record.path if is_external(record.path) else os.path.join(root, record.path)
        if record.annotations.get(LOAD_ERROR):  # never opened: the mapper records why
            if record.path in held:
                duplicates.append(record.path)
            else:
                fresh.append(record)
            continue
        try:
            with open(full, "rb") as handle:
                digest = file_hash(handle.read())
        except OSError:
            digest = None  # unreadable: the mapper records the failure
        if record.path in held or (digest is not None and (digest in known or digest in seen)):
            duplicates.append(record.path)
            continue
        if digest is not None:
            seen.add(digest)
        fresh.append(record)
    for path in duplicates:
        log.info("already in the gallery, skipped: %s", path)
    if not fresh:
        return ChangeResult(operation, info.generation, duplicates=tuple(duplicates))
    change = _embed(layout, info, fresh, root, workers, pipeline)
    result = _commit(layout, info, change, operation)
    return dataclasses.replace(result, duplicates=tuple(duplicates))


def enroll_image(
    gallery_dir: str | os.PathLike[str], data: bytes, identity: str | None, pipeline: FacePipeline | None = None,
    max_pixels: int | None = None,
) -> ChangeResult:
    """Add an uploaded image (bytes): it is stored in GALLERY/enrolled/ under its content hash,
    so the gallery can show it, and deleted with its last face."""
    load_image_bytes(data, max_pixels or 50_000_000)  # a clear ImageError before anything is written
    with writing(gallery_dir, "enroll") as (layout, info):
        digest = file_hash(data)
        path = layout.enrolled_dir.resolve() / f"{digest}.img"
        if digest in {h for h in gallery_images(layout, info).values() if h is not None}:
            return ChangeResult("enroll", info.generation, duplicates=(str(path),))
        write_bytes_atomic(path, lambda tmp: tmp.write_bytes(data))
        result = _add_records(layout, info, [ImageRecord(str(path), identity, None)], "/", 0, pipeline, "enroll")
        if not result.faces_added:
            path.unlink(missing_ok=True)
        return result


# --- remove --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemovalPlan:
    """The faces and images a removal takes away (``--dry-run`` shows it)."""

    face_ids: tuple[int, ...]
    paths: tuple[str, ...]  # images all of whose faces and failure records go
    failure_paths: tuple[str, ...]
    identities: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.face_ids or self.failure_paths)


def plan_removal(
    layout: GalleryLayout, info: GalleryInfo, face_ids: Iterable[int] = (), identities: Iterable[str] = (),
    paths: Iterable[str] = (),
) -> RemovalPlan:
    """Resolve what ``face_ids``, ``identities`` and image ``paths`` name. Unknown ones are an error:
    a removal request that matches nothing must not look done."""
    face_ids, identities, paths = set(int(i) for i in face_ids), set(identities), set(paths)
    faces = pa.concat_tables([pq.read_table(f, columns=["face_id", "path", "identity"]) for f in layout.manifest_files(info)])
    fail_parts = layout.failure_files(info)
    fails = (pa.concat_tables([pq.read_table(f, columns=["path", "identity"]) for f in fail_parts])
             if fail_parts else pa.table({"path": pa.array([], pa.string()), "identity": pa.array([], pa.string())}))
    ids = faces.column("face_id").to_numpy()
    unknown = sorted(face_ids - set(ids.tolist()))
    if unknown:
        raise NotFoundError(f"no face {', '.join(map(str, unknown[:10]))} in this gallery")
    known_identities = set(faces.column("identity").to_pylist()) | set(fails.column("identity").to_pylist())
    missing = sorted(identities - known_identities)
    if missing:
        raise NotFoundError(f"{len(missing)} identit{'y' if len(missing) == 1 else 'ies'} not in this gallery")
    known_paths = set(faces.column("path").to_pylist()) | set(fails.column("path").to_pylist())
    absent = sorted(paths - known_paths)
    if absent:
        raise NotFoundError(f"{len(absent)} path(s) not in this gallery, e.g. {absent[0]}")
    by_identity = pc.is_in(faces.column("identity"), pa.array(sorted(identities), pa.string()))
    by_path = pc.is_in(faces.column("path"), pa.array(sorted(paths), pa.string()))
    by_id = pc.is_in(faces.column("face_id"), pa.array(sorted(face_ids), pa.int64()))
    chosen = faces.filter(pc.or_(pc.or_(by_identity, by_path), by_id))
    fail_chosen = fails.filter(pc.or_(pc.is_in(fails.column("identity"), pa.array(sorted(identities), pa.string())),
                                      pc.is_in(fails.column("path"), pa.array(sorted(paths), pa.string()))))
    chosen_ids = set(chosen.column("face_id").to_pylist())
    # an image goes whole when every one of its faces goes
    remaining = faces.filter(pc.invert(pc.is_in(faces.column("face_id"), pa.array(sorted(chosen_ids), pa.int64()))))
    still = set(remaining.column("path").to_pylist())
    whole = sorted({p for p in chosen.column("path").to_pylist() if p not in still})
    return RemovalPlan(tuple(sorted(chosen_ids)), tuple(whole), tuple(sorted(set(fail_chosen.column("path").to_pylist()))),
                       tuple(sorted(identities)))


def remove_faces(
    gallery_dir: str | os.PathLike[str], face_ids: Iterable[int] = (), identities: Iterable[str] = (),
    paths: Iterable[str] = (), dry_run: bool = False,
) -> tuple[RemovalPlan, ChangeResult]:
    """Remove faces physically: by id, by identity (all its faces and failure records), or by
    image path. The parts that held them are rewritten without them, the index no longer holds
    their vectors, and pages derived from them are deleted; the calibration is marked stale."""
    face_ids, identities, paths = tuple(face_ids), tuple(identities), tuple(paths)
    if not (face_ids or identities or paths):
        raise ConfigurationError("name what to remove: face ids, identities or paths")
    with writing(gallery_dir, "face-index remove") as (layout, info):
        plan = plan_removal(layout, info, face_ids, identities, paths)
        if dry_run or plan.empty:
            return plan, ChangeResult("remove", info.generation, dry_run=dry_run)
        change = _Change(drop_face_ids=set(plan.face_ids), drop_paths=set(plan.failure_paths) | set(paths))
        return plan, _commit(layout, info, change, "remove")


def still_in_dataset(layout: GalleryLayout, info: GalleryInfo, paths: Iterable[str]) -> list[str]:
    """Removed dataset images that are still on disk: the next sync would add them back."""
    root = info.dataset_root
    return [p for p in paths if root is not None and not is_external(p) and (Path(root) / p).exists()]


# --- sync -----------------------------------------------------------------------------------

def sync_gallery(
    gallery_dir: str | os.PathLike[str], workers: int = 0, dry_run: bool = False, pipeline: FacePipeline | None = None,
) -> tuple[DatasetDiff, ChangeResult]:
    """Bring a gallery in line with its dataset root: add new images, remove vanished ones,
    re-embed changed ones (by content hash). Images added from outside the dataset stay."""
    with writing(gallery_dir, "face-index sync") as (layout, info):
        listing: DatasetListing = read_listing(run_config(layout))
        diff = dataset_diff(gallery_images(layout, info), listing)
        if dry_run or diff.empty:
            return diff, ChangeResult("sync", info.generation, dry_run=dry_run)
        change = _embed(layout, info, diff.new + diff.changed, listing.root, workers, pipeline)
        change.drop_paths = set(diff.vanished) | {r.path for r in diff.changed}
        return diff, _commit(layout, info, change, "sync")
