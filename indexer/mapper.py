"""Mapper: image records -> face rows or failure records.

Runs in worker processes. Every error of one image becomes that image's
failure record; nothing one image does stops the run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from data.images import ImageLoadError, read_image
from data.records import LOAD_ERROR, ImageRecord
from embedder.pipeline import FacePipeline, PipelineConfig
from embedder.runtime import configure_process
from embedder.types import Detection, Face
from indexer.layout import FailureKind

log = logging.getLogger(__name__)

#: Decoded pixels a worker holds at once to run the pipeline stage by stage (see
#: FaceMapper.prepare): 16 CelebA or LFW images, or a single large photo.
PHASE_PIXELS = 1_000_000
_NO_CROPS = np.zeros((0, 1, 1, 3), np.uint8)


@dataclass(frozen=True, eq=False)
class _Loaded:
    """A decoded image waiting for the pipeline's stages."""

    record: ImageRecord
    image: np.ndarray
    digest: str


@dataclass(frozen=True, eq=False)
class FaceRow:
    """One manifest row, before its global face_id is known."""

    path: str
    identity: str | None
    split: str | None
    face_index: int
    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[float, ...]  # 10 values: x, y of each LANDMARK_NAMES point
    embedding: np.ndarray
    width: int
    height: int
    content_hash: str | None = None  # sha256 of the image file


@dataclass(frozen=True)
class Failure:
    """An image that gave no face row. stage: load, detect or embed; kind: a FailureKind value."""

    path: str
    identity: str | None
    split: str | None
    stage: str
    reason: str
    kind: str = ""
    content_hash: str | None = None

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", FailureKind.of_stage(self.stage).value)


@dataclass(frozen=True, eq=False)
class MappedImage:
    record: ImageRecord
    faces: tuple[FaceRow, ...]
    failure: Failure | None


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image after the CPU stages: its detections and aligned crops, not yet
    embedded. Workers send these to the process that runs the embedder."""

    record: ImageRecord
    shape: tuple[int, int]
    detections: tuple[Detection, ...]
    crops: np.ndarray
    failure: Failure | None = None
    content_hash: str | None = None


def _failure_record(record: ImageRecord, stage: str, reason: str, kind: str = "",
                    content_hash: str | None = None) -> Failure:
    return Failure(record.path, record.identity, record.split, stage, reason, kind, content_hash)


def _failure(record: ImageRecord, stage: str, reason: str, content_hash: str | None = None) -> MappedImage:
    return MappedImage(record, (), _failure_record(record, stage, reason, content_hash=content_hash))


def _rows(prepared: "PreparedImage", faces: Sequence[Face]) -> MappedImage:
    record, shape = prepared.record, prepared.shape
    if not faces:
        return MappedImage(record, (), _failure_record(record, "detect", "no face found", FailureKind.NO_FACE.value,
                                                       prepared.content_hash))
    rows = tuple(
        FaceRow(
            path=record.path, identity=record.identity, split=record.split, face_index=face.face_index,
            box=face.detection.box, score=face.detection.score,
            landmarks=tuple(float(v) for v in np.asarray(face.detection.landmarks).reshape(-1)),
            embedding=np.asarray(face.embedding, dtype=np.float32), width=int(shape[1]), height=int(shape[0]),
            content_hash=prepared.content_hash,
        )
        for face in faces
    )
    return MappedImage(record, rows, None)


class FaceMapper:
    """Turns batches of records into MappedImage results with one pipeline.

    ``prepare`` runs the CPU stages (decode, detect, landmarks, crops) and
    ``finish`` embeds the crops of many images in one call; ``__call__`` does
    both. The pipeline (and its models) is built on first use in each process.
    """

    def __init__(
        self, root: str, pipeline: PipelineConfig, max_pixels: int, built: FacePipeline | None = None
    ) -> None:
        """built: a pipeline of this config already made in this process, to reuse."""
        self.root = root
        self.pipeline_config = pipeline
        self.max_pixels = max_pixels
        self._pipeline: FacePipeline | None = built

    @property
    def pipeline(self) -> FacePipeline:
        if self._pipeline is None:
            self._pipeline = FacePipeline(self.pipeline_config)
        return self._pipeline

    def __call__(self, records: Sequence[ImageRecord]) -> list[MappedImage]:
        return self.finish(self.prepare(records))

    def prepare(self, records: Sequence[ImageRecord]) -> list[PreparedImage]:
        """The CPU stages of ``records``, in order. Images are decoded into groups of at
        most PHASE_PIXELS pixels, and each group goes through one stage at a time (all
        detections, then all landmarks, then all crops) rather than one image at a
        time: each model's working set then stays in the CPU caches from one image to
        the next (on CelebA crops 17% less time per image, the same results)."""
        out: list[PreparedImage] = []
        group: list[_Loaded] = []
        pixels = 0
        for record in records:
            loaded = self._load(record)
            if isinstance(loaded, PreparedImage):
                out.extend(self._stages(group))
                group, pixels = [], 0
                out.append(loaded)
                continue
            group.append(loaded)
            pixels += loaded.image.shape[0] * loaded.image.shape[1]
            if pixels >= PHASE_PIXELS:
                out.extend(self._stages(group))
                group, pixels = [], 0
        out.extend(self._stages(group))
        return out

    def _load(self, record: ImageRecord) -> _Loaded | PreparedImage:
        """The decoded image, or the record's load failure."""
        if record.annotations.get(LOAD_ERROR):  # the reader knows it cannot be opened (name not UTF-8, broken link)
            return PreparedImage(record, (0, 0), (), _NO_CROPS,
                                 _failure_record(record, "load", str(record.annotations[LOAD_ERROR])))
        try:
            image, digest = read_image(os.path.join(self.root, record.path), self.max_pixels)
        except ImageLoadError as err:
            return PreparedImage(record, (0, 0), (), _NO_CROPS,
                                 _failure_record(record, "load", err.reason, content_hash=err.content_hash),
                                 err.content_hash)
        return _Loaded(record, image, digest)

    def _stages(self, group: Sequence[_Loaded]) -> list[PreparedImage]:
        """Detect, then locate landmarks, then crop, each stage over the whole group. An
        error in any stage becomes that image's detect failure and skips its later stages."""
        if not group:
            return []
        pipeline = self.pipeline
        failures: dict[int, PreparedImage] = {}

        def each(stage: Callable[..., Any], *inputs: dict[int, Any]) -> dict[int, Any]:
            out = {}
            for i, item in enumerate(group):
                if i in failures:
                    continue
                try:
                    out[i] = stage(item.image, *(given[i] for given in inputs))
                except Exception as err:  # noqa: BLE001 - recorded as the image's failure
                    log.warning("face detection failed on %s: %s", item.record.path, err, exc_info=True)
                    failures[i] = PreparedImage(
                        item.record, item.image.shape[:2], (), _NO_CROPS,
                        _failure_record(item.record, "detect", f"{type(err).__name__}: {err}",
                                        content_hash=item.digest), item.digest)
            return out

        detections = each(pipeline.locate, each(pipeline.find_faces))
        crops = each(pipeline.crops, detections)
        return [failures[i] if i in failures else
                PreparedImage(item.record, item.image.shape[:2], tuple(detections[i]), crops[i], content_hash=item.digest)
                for i, item in enumerate(group)]

    def finish(self, prepared: Sequence[PreparedImage]) -> list[MappedImage]:
        """Embed the crops of all ``prepared`` images in one call; rows in order."""
        with_faces = [p for p in prepared if p.failure is None and len(p.detections)]
        embedded: dict[int, np.ndarray | MappedImage] = {}
        if with_faces:
            try:
                vectors = self.pipeline.embed_groups([p.crops for p in with_faces])
            except Exception:  # noqa: BLE001 - one bad crop must not sink the batch: isolate it
                embedded = {id(p): self._embed_one(p) for p in with_faces}
            else:
                embedded = {id(p): v for p, v in zip(with_faces, vectors)}
        out = []
        for p in prepared:
            if p.failure is not None:
                out.append(MappedImage(p.record, (), p.failure))
                continue
            got = embedded.get(id(p))
            if isinstance(got, MappedImage):
                out.append(got)
                continue
            faces = [Face(i, d, got[i]) for i, d in enumerate(p.detections)] if got is not None else []
            out.append(_rows(p, faces))
        return out

    def _embed_one(self, prepared: PreparedImage) -> np.ndarray | MappedImage:
        try:
            return self.pipeline.embed_crops(prepared.crops)
        except Exception as err:  # noqa: BLE001 - recorded as the image's failure
            log.warning("embedding failed on %s: %s", prepared.record.path, err, exc_info=True)
            return _failure(prepared.record, "embed", f"{type(err).__name__}: {err}", prepared.content_hash)


# Worker-process state: one mapper per process, set by the pool initializer.
_WORKER_MAPPER: FaceMapper | None = None


def init_worker(pipeline: PipelineConfig, max_pixels: int) -> None:
    """Set up a worker process: its mapper, and every model loaded now (``warm_up``),
    so that a pool started early has its models ready when the first images come.
    The dataset root comes with each task."""
    global _WORKER_MAPPER
    import signal

    # Ctrl-C is the parent's to handle: it stops the pool and keeps finished partitions.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each worker runs one image at a time: keep native thread pools to one thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    configure_process(torch_threads=1)
    _WORKER_MAPPER = FaceMapper("", pipeline, max_pixels)
    try:
        _WORKER_MAPPER.pipeline.warm_up()
    except Exception as err:  # noqa: BLE001 - the first image meets it again, and records it as its failure
        log.warning("worker could not load its models: %s: %s", type(err).__name__, err)


def _worker_mapper(root: str) -> FaceMapper:
    if _WORKER_MAPPER is None:  # pragma: no cover - misuse
        raise RuntimeError("worker not initialised")
    _WORKER_MAPPER.root = root
    return _WORKER_MAPPER


def map_in_worker(root: str, records: Sequence[ImageRecord]) -> list[MappedImage]:
    """Every stage, embedding included, in the worker; paths relative to ``root``."""
    return _worker_mapper(root)(records)


def prepare_in_worker(root: str, records: Sequence[ImageRecord]) -> list[PreparedImage]:
    """The CPU stages only; the caller embeds the crops in batches."""
    return _worker_mapper(root).prepare(records)
