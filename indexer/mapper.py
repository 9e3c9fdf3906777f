"""Mapper: image records -> face rows or failure records.

Runs in worker processes. Every error of one image becomes that image's
failure record; nothing one image does stops the run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data.images import ImageLoadError, load_image
from data.records import ImageRecord
from embedder.pipeline import FacePipeline, PipelineConfig
from embedder.types import Face

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Failure:
    """An image that gave no face row. stage: load, detect or embed."""

    path: str
    identity: str | None
    split: str | None
    stage: str
    reason: str


@dataclass(frozen=True, eq=False)
class MappedImage:
    record: ImageRecord
    faces: tuple[FaceRow, ...]
    failure: Failure | None


def _failure(record: ImageRecord, stage: str, reason: str) -> MappedImage:
    return MappedImage(record, (), Failure(record.path, record.identity, record.split, stage, reason))


def _rows(record: ImageRecord, faces: Sequence[Face], shape: tuple[int, ...]) -> MappedImage:
    if not faces:
        return _failure(record, "detect", "no face found")
    rows = tuple(
        FaceRow(
            path=record.path, identity=record.identity, split=record.split, face_index=face.face_index,
            box=face.detection.box, score=face.detection.score,
            landmarks=tuple(float(v) for v in np.asarray(face.detection.landmarks).reshape(-1)),
            embedding=np.asarray(face.embedding, dtype=np.float32), width=int(shape[1]), height=int(shape[0]),
        )
        for face in faces
    )
    return MappedImage(record, rows, None)


class FaceMapper:
    """Turns batches of records into MappedImage results with one pipeline.

    The pipeline (and its models) is built on first use in each process.
    """

    def __init__(self, root: str, pipeline: PipelineConfig, max_pixels: int) -> None:
        self.root = root
        self.pipeline_config = pipeline
        self.max_pixels = max_pixels
        self._pipeline: FacePipeline | None = None

    @property
    def pipeline(self) -> FacePipeline:
        if self._pipeline is None:
            self._pipeline = FacePipeline(self.pipeline_config)
        return self._pipeline

    def __call__(self, records: Sequence[ImageRecord]) -> list[MappedImage]:
        results: list[MappedImage | None] = [None] * len(records)
        images: list[np.ndarray] = []
        slots: list[int] = []
        for i, record in enumerate(records):
            try:
                images.append(load_image(os.path.join(self.root, record.path), self.max_pixels))
                slots.append(i)
            except ImageLoadError as err:
                results[i] = _failure(record, "load", err.reason)
        try:
            batches = self.pipeline.batch(images)
        except Exception:  # one bad image must not sink the batch: isolate it
            batches = [self._one(records[i], image) for i, image in zip(slots, images)]
        for i, image, faces in zip(slots, images, batches):
            if isinstance(faces, MappedImage):
                results[i] = faces
            else:
                results[i] = _rows(records[i], faces, image.shape)
        return [r for r in results if r is not None]

    def _one(self, record: ImageRecord, image: np.ndarray) -> list[Face] | MappedImage:
        try:
            return self.pipeline(image)
        except Exception as err:  # noqa: BLE001 - recorded as the image's failure
            log.warning("face pipeline failed on %s: %s", record.path, err, exc_info=True)
            return _failure(record, "embed", f"{type(err).__name__}: {err}")


# Worker-process state: one mapper per process, set by the pool initializer.
_WORKER_MAPPER: FaceMapper | None = None


def init_worker(root: str, pipeline: PipelineConfig, max_pixels: int) -> None:
    global _WORKER_MAPPER
    import signal

    # Ctrl-C is the parent's to handle: it stops the pool and keeps finished partitions.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each worker runs one image at a time: keep native thread pools to one thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_MAPPER = FaceMapper(root, pipeline, max_pixels)


def map_in_worker(records: Sequence[ImageRecord]) -> list[MappedImage]:
    if _WORKER_MAPPER is None:  # pragma: no cover - misuse
        raise RuntimeError("worker not initialised")
    return _WORKER_MAPPER(records)
