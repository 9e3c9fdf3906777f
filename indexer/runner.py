"""Runner: drives reader -> mapper -> writer over the missing partitions.

Rerunning the same command after an interruption (Ctrl-C, kill -9) computes
only the partitions that have no manifest file yet; the result equals an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
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
from typing import Callable, Iterable, Iterator, Sequence

from data.records import ImageRecord
from embedder.pipeline import FacePipeline
from indexer.build import build_gallery
from indexer.config import RUN_FILE, RunConfig, check_or_write_run_config
from indexer.mapper import FaceMapper, MappedImage, PreparedImage, init_worker, map_in_worker, prepare_in_worker
from indexer.reader import Partition, plan_partitions, read_listing
from indexer.writer import FAILURES_DIR, MANIFEST_DIR, clean_temporaries, manifest_parts, row_count, write_partition

log = logging.getLogger(__name__)

#: Images per task sent to a worker.
TASK_IMAGES = 4
#: Faces per embedding call when the main process embeds (batched embedders).
EMBED_BATCH = 64


class IndexRunError(Exception):
    """The run could not go on; completed partitions are kept."""


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
    index_type: str = "flat",
    embed_in: str = "auto",
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
    """
    out = Path(gallery_dir)
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if embed_in not in ("auto", "main", "workers"):
        raise ValueError(f"embed_in must be auto, main or workers, got {embed_in!r}")
    # Fail fast on bad settings (unknown backends, an empty dataset) before
    # touching the disk, and record every backend option as resolved now
    # (defaults may change later).
    pipeline = FacePipeline(config.pipeline)
    config = dataclasses.replace(config, pipeline=pipeline.resolved_config())
    listing = read_listing(config)
    if not listing.records:
        raise IndexRunError(f"no images found in {listing.root} (format {listing.format}, split {config.split})")
    if overwrite and out.exists():
        for name in (MANIFEST_DIR, FAILURES_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (RUN_FILE, "gallery.json", "index.faiss"):
            (out / name).unlink(missing_ok=True)
    resumed = check_or_write_run_config(out, config)
    clean_temporaries(out)

    partitions = plan_partitions(listing.records, config.partition_size)
    done = {p.stem for p in manifest_parts(out)}
    todo = [p for p in partitions if p.name not in done]
    if resumed:
        log.info("resuming: %d of %d partitions already done", len(partitions) - len(todo), len(partitions))
    log.info(
        "indexing %d images of %s (%s) into %s: %d partitions of up to %d, %d workers",
        len(listing.records), listing.root, listing.format, out, len(partitions), config.partition_size, workers,
    )

    start = time.perf_counter()
    faces_written = failures_written = processed = 0
    first_result: tuple[float, int] | None = None  # when the first images came back: start-up is over
    face_ids = _FaceIds(out, partitions)
    bar = _progress(len(listing.records), progress)
    bar.update(sum(len(p.records) for p in partitions if p.name in done))
    executor = None
    main_mapper = FaceMapper(listing.root, config.pipeline, config.max_pixels, built=pipeline)
    # A batched (torch) embedder on CUDA runs here on whole batches of crops and
    # the workers stop at the crops; on CPU, and for dlib's own embedder, each
    # worker embeds its own images.
    if embed_in == "auto":
        on_gpu = str(getattr(pipeline.embedder, "resolved_device", lambda: "cpu")()).startswith("cuda")
        embed_in = "main" if on_gpu else "workers"
    split_embedding = workers > 0 and pipeline.embeds_in_batches and embed_in == "main"
    log.debug("embedding in %s", "the main process" if split_embedding else "the workers")
    try:
        if workers == 0:

            def submit(task: tuple[ImageRecord, ...]) -> Future:
                future: Future = Future()
                future.set_result(main_mapper(task))
                return future

        else:
            executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker,
                initargs=(listing.root, config.pipeline, config.max_pixels),
            )
            work = prepare_in_worker if split_embedding else map_in_worker

            def submit(task: tuple[ImageRecord, ...]) -> Future:
                return executor.submit(work, task)

        window = max(4, workers * 4, (2 * EMBED_BATCH // TASK_IMAGES) if split_embedding else 0)
        results = _ordered(submit, (t for p in todo for t in _chunks(p.records, TASK_IMAGES)), window=window)
        for part in todo:
            rows, failures = [], []
            buffer: list[PreparedImage] = []

            def collect(mapped_images: list[MappedImage]) -> None:
                for mapped in mapped_images:
                    rows.extend(mapped.faces)
                    if mapped.failure is not None:
                        failures.append(mapped.failure)

            remaining = len(part.records)
            while remaining > 0:
                batch = next(results)
                if split_embedding:
                    buffer.extend(batch)
                    if sum(len(p.detections) for p in buffer) >= EMBED_BATCH or remaining == len(batch):
                        collect(main_mapper.finish(buffer))
                        buffer = []
                else:
                    collect(batch)
                remaining -= len(batch)
                processed += len(batch)
                if first_result is None:
                    first_result = (time.perf_counter(), processed)
                bar.update(len(batch))
            first_face_id = face_ids.first(part.index)
            write_partition(out, part.name, rows, failures, first_face_id, pipeline.dim)
            face_ids.written(part.index, len(rows))
            faces_written += len(rows)
            failures_written += len(failures)
            log.debug("wrote %s: %d faces, %d failures", part.name, len(rows), len(failures))
    except BrokenProcessPool as err:
        raise IndexRunError(
            "a worker process died (out of memory, or a crash in native code); completed partitions are kept: "
            "rerun the same command to resume"
        ) from err
    except KeyboardInterrupt:
        log.warning("interrupted: completed partitions are kept; rerun the same command to resume")
        raise
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    seconds = time.perf_counter() - start
    if processed:
        steady = ""
        if first_result is not None and processed > first_result[1]:
            after = (processed - first_result[1]) / max(1e-9, time.perf_counter() - first_result[0])
            steady = f", {after:.2f} images/s after start-up"
        log.info("processed %d images in %.1f s (%.2f images/s%s)", processed, seconds, processed / seconds, steady)
    if build:
        build_gallery(out, index_type=index_type, listing=listing)
    summary = RunSummary(
        gallery_dir=str(out), images=len(listing.records), partitions=len(partitions),
        partitions_done_before=len(partitions) - len(todo), partitions_written=len(todo),
        images_processed=processed, faces_written=faces_written, failures_written=failures_written, seconds=seconds,
    )
    return summary


class _FaceIds:
    """Face ids continue from the partitions before: partitions are written in
    order, so those are complete (build re-checks contiguity)."""

    def __init__(self, out: Path, partitions: Sequence[Partition]) -> None:
        self.counts: dict[int, int] = {}
        for part in partitions:
            path = out / MANIFEST_DIR / f"{part.name}.parquet"
            if path.exists():
                self.counts[part.index] = row_count(path)

    def first(self, index: int) -> int:
        return sum(n for i, n in self.counts.items() if i < index)

    def written(self, index: int, rows: int) -> None:
        self.counts[index] = rows
