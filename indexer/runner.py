"""Runner: drives reader -> mapper -> writer over the missing partitions.

Rerunning the same command after an interruption (Ctrl-C, kill -9) computes
only the partitions that have no manifest file yet; the result equals an
uninterrupted run.

An *engine* maps the partitions still to do: ``LocalEngine`` (a process pool on
this machine, the default) or ``indexer.ray_engine.RayEngine`` (a Ray cluster).
Everything else (options, listing, lock, run.json, resume checks, build) is the
runner's, whatever the engine.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Generator, Iterable, Iterator, Protocol, Sequence

import pyarrow.parquet as pq

from data.records import SKIP_PROBLEMS, DatasetListing, ImageRecord, skipped_summary
from embedder.pipeline import FacePipeline
from facesearch.errors import ConfigurationError, GalleryError
from indexer.build import build_gallery
from indexer.catalog import dataset_diff, gallery_images, records_paths
from indexer.config import RunConfig, check_or_write_run_config
from indexer.layout import FAILURES_DIR, MANIFEST_DIR, PIPELINE_FILE, GalleryLayout, row_count, write_json_atomic
from indexer.lock import WriterLock
from indexer.mapper import (
    FaceMapper, FaceRow, Failure, MappedImage, PreparedImage, init_worker, map_in_worker, prepare_in_worker,
)
from indexer.reader import Partition, plan_partitions, read_listing
from indexer.writer import write_partition

log = logging.getLogger(__name__)

#: Images per task sent to a worker.
TASK_IMAGES = 16
#: Faces per embedding call when the main process embeds (batched embedders).
EMBED_BATCH = 64


class IndexRunError(GalleryError):
    """The run could not go on; completed partitions are kept."""


class DatasetChangedError(GalleryError):
    """The dataset no longer matches what the gallery (or the unfinished run) holds."""


@dataclass(frozen=True)
class RunSummary:
    gallery_dir: str
    images: int
    partitions: int
    partitions_done_before: int
    partitions_written: int
    images_processed: int
    faces_written: int
    failures_written: int
    seconds: float
    up_to_date: bool = False  # a built gallery that already matched its dataset: nothing was done
    skipped: int = 0  # paths below the dataset root that the reader did not list (DatasetListing.skipped)

    @property
    def images_per_second(self) -> float:
        return self.images_processed / self.seconds if self.seconds > 0 else 0.0


def _chunks(records: Sequence[ImageRecord], size: int) -> Iterator[tuple[ImageRecord, ...]]:
    for start in range(0, len(records), size):
        yield tuple(records[start : start + size])


def _ordered(
    submit: Callable[[tuple[ImageRecord, ...]], Future], tasks: Iterable[tuple[ImageRecord, ...]], window: int
) -> Iterator[list[MappedImage]]:
    """Submit tasks keeping at most ``window`` in flight; yield results in order.
    Memory stays bounded whatever the dataset's size."""
    pending: deque[Future] = deque()
    for task in tasks:
        pending.append(submit(task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@dataclass(frozen=True)
class PartitionJob:
    """What an engine maps: ``todo`` (partitions without a manifest part) of ``partitions``
    (all of the run's, in order), each written with ``writer.write_partition`` once complete
    and with face ids that continue from the partitions before it (``FaceIds``)."""

    layout: GalleryLayout
    config: RunConfig
    listing: DatasetListing
    pipeline: FacePipeline
    partitions: Sequence[Partition]
    todo: Sequence[Partition]
    progress: bool


class Engine(Protocol):
    """Maps the partitions of a run. Entered (``with engine:``) before the writer lock is
    taken, so that a cluster that cannot be reached fails before anything is written."""

    def __enter__(self) -> "Engine": ...

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None: ...

    def describe(self) -> str:
        """Where the work runs, for the log (e.g. "2 workers")."""
        ...

    def prestart(self, config: RunConfig, pipeline: FacePipeline) -> None:
        """Start what the run will need (workers, models) while the dataset is listed;
        called once, after ``__enter__``, before anything is written. May do nothing."""
        ...

    def map_partitions(self, job: PartitionJob) -> RunSummary: ...


class LocalEngine:
    """Worker processes on this machine (``map_records``): the default engine.

    ``prestart`` starts the workers (and loads their models) before the run lists its
    dataset, so that the two overlap; the pool lives until the engine is left."""

    def __init__(self, workers: int | None = None, embed_in: str = "auto") -> None:
        self.workers = _check_run_options(workers, embed_in)
        self.embed_in = embed_in
        self._pool: _MapperPool | None = None

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.__exit__(kind, err, tb)

    def describe(self) -> str:
        return f"{self.workers} workers"

    def prestart(self, config: RunConfig, pipeline: FacePipeline) -> None:
        if self.workers == 0 or self._pool is not None:
            return
        split = _resolve_embed_in(self.embed_in, pipeline, self.workers) == "main"
        mapper = FaceMapper("", config.pipeline, config.max_pixels, built=pipeline)
        self._pool = _MapperPool(mapper, self.workers, split).__enter__()
        self._pool.start()

    def map_partitions(self, job: PartitionJob) -> RunSummary:
        embed_in = _resolve_embed_in(self.embed_in, job.pipeline, self.workers)
        pool, self._pool = self._pool, None
        if pool is not None and not pool.serves(job.config.pipeline, job.config.max_pixels, embed_in == "main"):
            pool.__exit__(None, None, None)
            pool = None
        return _map_partitions(job.layout, job.config, job.listing, job.pipeline, job.partitions, job.todo,
                               self.workers, embed_in, job.progress, pool=pool)


def _progress(total: int, enabled: bool):  # noqa: ANN202 - tqdm or a no-op
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=not enabled, smoothing=0.1, dynamic_ncols=True, desc="indexing")


def run_index(
    config: RunConfig,
    gallery_dir: str | os.PathLike[str],
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    build: bool = True,
    index_type: str = "auto",
    embed_in: str = "auto",
    target_recall: float = 0.95,
    engine: Engine | None = None,
) -> RunSummary:
    """Index ``config``'s dataset into ``gallery_dir``, resuming an earlier run.

    workers: worker processes for decode/detect/embed (default: the core
        count; 0 runs everything in this process, for debugging).
    overwrite: discard what the gallery directory holds from another run.
    build: build the FAISS index and gallery.json at the end.
    embed_in: where a batched (torch) embedder runs: "main" (this process, whole
        batches; best on a GPU), "workers" (each worker embeds its own images
        on one thread; best on a CPU, no oversubscription, no crops sent
        between processes) or "auto" (main on CUDA, workers otherwise).
    engine: what maps the partitions; default ``LocalEngine(workers, embed_in)``. With
        another engine (``indexer.ray_engine.RayEngine``) leave workers and embed_in unset.

    On a gallery that is already built, nothing is recomputed: the run says the
    gallery is up to date, or raises DatasetChangedError pointing to face-index sync.
    """
    if engine is None:
        engine = LocalEngine(workers, embed_in)
    elif workers is not None or embed_in != "auto":
        raise ConfigurationError("workers and embed_in belong to the local engine; set them on the engine instead")
    # Fail fast on bad settings (unknown backends, an empty dataset) before
    # touching the disk, and record every backend option as resolved now
    # (defaults may change later).
    pipeline = FacePipeline(config.pipeline)
    config = dataclasses.replace(config, pipeline=pipeline.resolved_config())
    layout = GalleryLayout(Path(gallery_dir))
    with engine:
        if overwrite or not layout.info_file.exists():  # work to do, most likely: start workers while listing
            engine.prestart(config, pipeline)
        listing = read_listing(config)
        log_skipped(listing)
        if not listing.records:
            raise IndexRunError(f"no images found in {listing.root} (format {listing.format}, split {config.split})")
        return _run_locked(engine, layout, config, listing, pipeline, overwrite, progress, build, index_type,
                           target_recall)


def _run_locked(
    engine: Engine, layout: GalleryLayout, config: RunConfig, listing: DatasetListing, pipeline: FacePipeline,
    overwrite: bool, progress: bool, build: bool, index_type: str, target_recall: float,
) -> RunSummary:
    """The part of a run that holds the writer lock: check or resume, map, build."""
    with WriterLock(layout.root, "face-index run"):
        if overwrite:
            discard_gallery(layout)
        resumed = check_or_write_run_config(layout.root, config)
        layout.clean_temporaries()
        if layout.info_file.exists():
            return _check_built(layout, listing)
        write_json_atomic(layout.root / PIPELINE_FILE, {**pipeline.describe(), "config": config.pipeline.to_dict()})
        partitions = plan_partitions(listing.records, config.partition_size)
        done = _check_done_partitions(layout, partitions)
        todo = [p for p in partitions if p.name not in done]
        if resumed:
            log.info("resuming: %d of %d partitions already done", len(partitions) - len(todo), len(partitions))
        log.info(
            "indexing %d images of %s (%s) into %s: %d partitions of up to %d, %s",
            len(listing.records), listing.root, listing.format, layout.root, len(partitions), config.partition_size,
            engine.describe(),
        )
        summary = engine.map_partitions(PartitionJob(layout, config, listing, pipeline, partitions, todo, progress))
        summary = dataclasses.replace(summary, skipped=len(listing.skipped))
        if build:
            build_gallery(layout.root, index_type=index_type, listing=listing, target_recall=target_recall)
    return summary


def _check_run_options(workers: int | None, embed_in: str) -> int:
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise ConfigurationError(f"workers must be >= 0, got {workers}")
    if embed_in not in ("auto", "main", "workers"):
        raise ConfigurationError(f"embed_in must be auto, main or workers, got {embed_in!r}")
    return workers


def _resolve_embed_in(embed_in: str, pipeline: FacePipeline, workers: int) -> str:
    """Where a batched (torch) embedder runs: on CUDA, here on whole batches of crops
    while the workers stop at the crops; on CPU, and for dlib's own embedder, in each
    worker. Returns "main" or "workers"."""
    if embed_in == "auto":
        on_gpu = str(getattr(pipeline.embedder, "resolved_device", lambda: "cpu")()).startswith("cuda")
        embed_in = "main" if on_gpu else "workers"
    split = workers > 0 and pipeline.embeds_in_batches and embed_in == "main"
    log.debug("embedding in %s", "the main process" if split else "the workers")
    return "main" if split else "workers"


def discard_gallery(layout: GalleryLayout) -> None:
    """--overwrite: remove everything a gallery directory holds, derived pages included."""
    for folder in (layout.manifest_dir, layout.failures_dir, layout.enrolled_dir, layout.eval_dir):
        shutil.rmtree(folder, ignore_errors=True)
    for path in [layout.run_file, layout.info_file, layout.root / PIPELINE_FILE, layout.audit_file,
                 layout.changes_log, *layout.root.glob("index*.faiss")]:
        path.unlink(missing_ok=True)


def _check_built(layout: GalleryLayout, listing: DatasetListing) -> RunSummary:
    """A rerun on a built gallery: up to date, or the dataset changed (see face-index sync)."""
    info = layout.read_info()
    diff = dataset_diff(gallery_images(layout, info), listing)
    if not diff.empty:
        raise DatasetChangedError(
            f"the dataset changed since {layout.root} was built ({diff.summary()}): "
            f"run face-index sync {layout.root} to bring the gallery up to date"
        )
    log.info("%s is up to date with its dataset (%d images, %d faces)", layout.root, len(listing.records),
             info.counts.get("faces", 0))
    return RunSummary(str(layout.root), len(listing.records), 0, 0, 0, 0, 0, 0, 0.0, up_to_date=True,
                      skipped=len(listing.skipped))


def log_skipped(listing: DatasetListing) -> None:
    """One line for what the reader did not list (a warning when something is wrong on disk:
    a symlink loop, an unreadable folder), then each path at debug level."""
    if not listing.skipped:
        return
    problem = any(s.reason in SKIP_PROBLEMS for s in listing.skipped)
    log.log(logging.WARNING if problem else logging.INFO, "%s%s", skipped_summary(listing.skipped, listing.root),
            "; face-index -v lists each" if len(listing.skipped) > 1 else f" ({listing.skipped[0].path})")
    for entry in listing.skipped:
        log.debug("skipped %s: %s (%s)", entry.path, entry.reason, entry.detail)


def _check_done_partitions(layout: GalleryLayout, partitions: Sequence[Partition]) -> set[str]:
    """Names of the complete partitions, each checked to hold exactly the images the
    listing now puts there: a dataset that changed mid-run would shift partitions."""
    done = set()
    for part in partitions:
        manifest = layout.partition_file(MANIFEST_DIR, part.name)
        if not manifest.exists():
            continue
        files = [manifest] + [f for f in [layout.partition_file(FAILURES_DIR, part.name)] if f.exists()]
        held: set[str] = set()
        for f in files:
            held.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        planned = records_paths(part.records)
        if held != planned:
            raise DatasetChangedError(
                f"the dataset changed since this run started: {part.name} no longer matches it "
                f"({len(planned - held)} new, {len(held - planned)} vanished images). Keep what is done with "
                f"face-index build --drop-missing {layout.root} and then face-index sync {layout.root}, "
                "or rerun with --overwrite"
            )
        done.add(part.name)
    return done


def _map_partitions(
    layout: GalleryLayout, config: RunConfig, listing: DatasetListing, pipeline: FacePipeline,
    partitions: Sequence[Partition], todo: Sequence[Partition], workers: int, embed_in: str, progress: bool,
    pool: "_MapperPool | None" = None,
) -> RunSummary:
    """Run reader -> mapper -> writer over ``todo``, writing each partition when complete."""
    start = time.perf_counter()
    faces_written = failures_written = processed = 0
    first_result: tuple[float, int] | None = None  # when the first images came back: start-up is over
    face_ids = FaceIds(layout, partitions)
    bar = _progress(len(listing.records), progress)
    pending = {p.name for p in todo}
    bar.update(sum(len(p.records) for p in partitions if p.name not in pending))
    mapper = FaceMapper(listing.root, config.pipeline, config.max_pixels, built=pipeline)
    results = map_records(mapper, [r for p in todo for r in p.records], workers, embed_in,
                          boundaries=itertools.accumulate(len(p.records) for p in todo), pool=pool)
    try:
        for part in todo:
            rows: list[FaceRow] = []
            failures: list[Failure] = []
            for mapped in itertools.islice(results, len(part.records)):
                rows.extend(mapped.faces)
                if mapped.failure is not None:
                    failures.append(mapped.failure)
                processed += 1
                if first_result is None:
                    first_result = (time.perf_counter(), processed)
                bar.update(1)
            write_partition(layout.root, part.name, rows, failures, face_ids.first(part.index), pipeline.dim)
            face_ids.written(part.index, len(rows))
            faces_written += len(rows)
            failures_written += len(failures)
            log.debug("wrote %s: %d faces, %d failures", part.name, len(rows), len(failures))
    except KeyboardInterrupt:
        log.warning("interrupted: completed partitions are kept; rerun the same command to resume")
        raise
    finally:
        results.close()
        bar.close()
    seconds = time.perf_counter() - start
    _log_rate(processed, seconds, first_result)
    return RunSummary(
        gallery_dir=str(layout.root), images=len(listing.records), partitions=len(partitions),
        partitions_done_before=len(partitions) - len(todo), partitions_written=len(todo),
        images_processed=processed, faces_written=faces_written, failures_written=failures_written, seconds=seconds,
    )


def map_records(
    mapper: FaceMapper, records: Sequence[ImageRecord], workers: int, embed_in: str = "workers",
    boundaries: Iterable[int] = (), pool: "_MapperPool | None" = None,
) -> Generator[MappedImage, None, None]:
    """Every record's MappedImage, in order, computed by ``workers`` processes (0: here).
    embed_in "main": workers stop at the crops and this process embeds them in batches,
    never across ``boundaries`` (record counts: partition ends), so a resumed run batches,
    and so computes, exactly as an uninterrupted one. Memory stays bounded: a window of
    tasks is in flight. Close the generator to stop.
    pool: a started pool of this mapper's pipeline and mode to use (and shut down)."""
    split_embedding = embed_in == "main" and workers > 0
    if pool is None:
        pool = _MapperPool(mapper, workers, split_embedding)
    else:
        pool.mapper = mapper
    try:
        with pool:
            window = max(4, workers * 4, (2 * EMBED_BATCH // TASK_IMAGES) if split_embedding else 0)
            ends = sorted(set(boundaries) | {len(records)})
            tasks = (t for start, end in zip([0] + ends, ends) for t in _chunks(records[start:end], TASK_IMAGES))
            results = _ordered(pool.submit, tasks, window=window)
            yield from _embedded(results, mapper if split_embedding else None, set(ends))
    except BrokenProcessPool as err:
        raise IndexRunError(
            "a worker process died (out of memory, or a crash in native code); completed work is kept: "
            "rerun the same command to resume"
        ) from err


def _embedded(results: Iterator[list], embed_here: FaceMapper | None, boundaries: set[int]) -> Iterator[MappedImage]:
    """The mapped images of ``results``, in order. With ``embed_here``, results are
    PreparedImages whose crops this process embeds in batches of EMBED_BATCH faces."""
    buffer: list[PreparedImage] = []
    seen = 0
    for batch in results:
        if embed_here is None:
            yield from batch
            continue
        buffer.extend(batch)
        seen += len(batch)
        if sum(len(p.detections) for p in buffer) >= EMBED_BATCH or seen in boundaries:
            yield from embed_here.finish(buffer)
            buffer = []
    if buffer:
        yield from embed_here.finish(buffer)


def _log_rate(processed: int, seconds: float, first_result: tuple[float, int] | None) -> None:
    if not processed:
        return
    steady = ""
    if first_result is not None and processed > first_result[1]:
        after = (processed - first_result[1]) / max(1e-9, time.perf_counter() - first_result[0])
        steady = f", {after:.2f} images/s after start-up"
    log.info("processed %d images in %.1f s (%.2f images/s%s)", processed, seconds, processed / seconds, steady)


class _MapperPool:
    """Runs mapper tasks: in worker processes (spawn), or in this process when workers == 0.
    ``split_embedding``: workers stop at the crops (prepare) and this process embeds.
    Workers load their models when they start; each task carries the dataset root."""

    def __init__(self, mapper: FaceMapper, workers: int, split_embedding: bool) -> None:
        self.mapper = mapper
        self.workers = workers
        self.split_embedding = split_embedding
        self.work = prepare_in_worker if split_embedding else map_in_worker
        self.executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> "_MapperPool":
        if self.workers > 0 and self.executor is None:
            self.executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker,
                initargs=(self.mapper.pipeline_config, self.mapper.max_pixels),
            )
        return self

    def start(self) -> None:
        """Spawn the workers now rather than at the first task (they then load their models)."""
        if self.executor is not None:
            self.executor.submit(os.getpid)  # spawning is lazy: one task starts them all

    def serves(self, pipeline: object, max_pixels: int, split_embedding: bool) -> bool:
        """Whether this pool's workers were set up for these settings."""
        return (self.mapper.pipeline_config, self.mapper.max_pixels, self.split_embedding) == (
            pipeline, max_pixels, split_embedding)

    def submit(self, task: tuple[ImageRecord, ...]) -> Future:
        if self.executor is not None:
            return self.executor.submit(self.work, self.mapper.root, task)
        future: Future = Future()
        future.set_result(self.mapper(task))
        return future

    def __exit__(self, *exc: object) -> None:
        executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


class FaceIds:
    """Face ids continue from the partitions before: partitions are written in
    order, so those are complete (build re-checks contiguity). ``counts``: faces
    per partition index, of those written (or, for the Ray engine, computed)."""

    def __init__(self, layout: GalleryLayout, partitions: Sequence[Partition]) -> None:
        self.counts: dict[int, int] = {}
        for part in partitions:
            path = layout.partition_file(MANIFEST_DIR, part.name)
            if path.exists():
                self.counts[part.index] = row_count(path)

    def first(self, index: int) -> int:
        return sum(n for i, n in self.counts.items() if i < index)

    def written(self, index: int, rows: int) -> None:
        self.counts[index] = rows
