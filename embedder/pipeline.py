"""The face pipeline: image -> faces with embeddings.

detect (boxes) -> landmarks (5 points) -> align (crop the embedder declares)
-> embed (L2-normalised). Each stage is a backend chosen by name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

import embedder.backends  # noqa: F401  (registers the built-in backends)
from embedder import registry
from embedder.align import align_face
from embedder.types import Detection, Face
from embedder.vectors import l2_normalize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides what a pipeline computes; stored in gallery.json
    so that queries run the same pipeline as the index.

    flip: also embed the mirrored crop and average (about 2x embedding cost).
    max_faces: keep at most this many faces per image, largest first (None: all).
    min_face: ignore faces whose box is smaller than this many pixels a side.
    """

    detector: str = "dlib-hog"
    landmarks: str = "dlib-5"
    embedder: str = "dlib-resnet-onnx-int8"
    flip: bool = False
    max_faces: int | None = None
    min_face: float = 0.0
    detector_options: dict[str, Any] = field(default_factory=dict)
    landmarks_options: dict[str, Any] = field(default_factory=dict)
    embedder_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown pipeline settings: {', '.join(sorted(unknown))}")
        return cls(**data)


def _options(backend: Any) -> dict[str, Any]:
    """The constructor options a backend reports through ``options()``, if any."""
    options = getattr(backend, "options", None)
    return dict(options()) if callable(options) else {}


class FacePipeline:
    """Detect, align and embed every face of an image.

    >>> pipeline = FacePipeline()              # dlib HOG + dlib-5 + dlib ResNet, offline
    >>> faces = pipeline(load_image("me.jpg"))  # list[Face], largest face first
    """

    def __init__(self, config: PipelineConfig | None = None, **overrides: Any) -> None:
        config = config or PipelineConfig()
        if overrides:
            config = PipelineConfig.from_dict({**config.to_dict(), **overrides})
        if config.max_faces is not None and config.max_faces < 1:
            raise ValueError(f"max_faces must be >= 1 or None, got {config.max_faces}")
        self.config = config
        self.detector = registry.create("detector", config.detector, **config.detector_options)
        self.landmarker = registry.create("landmarks", config.landmarks, **config.landmarks_options)
        self.embedder = registry.create("embedder", config.embedder, **config.embedder_options)
        scheme = self.embedder.crop.scheme
        if scheme != "canonical5" and getattr(self.landmarker, "scheme", None) != scheme:
            raise ValueError(
                f"embedder {config.embedder} aligns on {scheme} keypoints, which landmark backend "
                f"{config.landmarks} does not give; choose one that does (e.g. dlib-5)"
            )

    @property
    def dim(self) -> int:
        return int(self.embedder.dim)

    # ------------------------------------------------------------------ stages
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Boxes and landmarks of the faces in ``image``, largest first."""
        return self.locate(image, self.find_faces(image))

    def find_faces(self, image: np.ndarray) -> list[Detection]:
        """The detector stage alone: boxes, largest first, after ``min_face`` and ``max_faces``."""
        detections = [
            d for d in self.detector.detect(image) if min(d.width, d.height) >= self.config.min_face
        ]
        detections.sort(key=lambda d: (-d.area, d.box[0]))
        if self.config.max_faces is not None:
            detections = detections[: self.config.max_faces]
        return detections

    def locate(self, image: np.ndarray, boxes: Sequence[Detection]) -> list[Detection]:
        """The landmark stage alone: ``boxes`` (from :meth:`find_faces`) with their landmarks."""
        return self.landmarker.landmarks(image, boxes) if boxes else []

    def crops(self, image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
        """The aligned crops the embedder needs, (N, H, W, 3) uint8."""
        width, height = self.embedder.crop.size
        if not detections:
            return np.zeros((0, height, width, 3), dtype=np.uint8)
        return np.stack([align_face(image, d, self.embedder.crop) for d in detections])

    def prepare(self, image: np.ndarray) -> tuple[list[Detection], np.ndarray]:
        """The CPU stages for one image: detections (with landmarks) and their crops."""
        detections = self.detect(image)
        return detections, self.crops(image, detections)

    @property
    def embeds_in_batches(self) -> bool:
        """True when the embedder gains from large batches in one process (torch,
        GPU): the indexer then embeds in its main process, workers stop at crops."""
        return bool(getattr(self.embedder, "batched", False))

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) crops -> (N, dim) L2-normalised float32 (flip-averaged if set)."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.embedder.embed(crops)
        if self.config.flip:
            mirrored = np.ascontiguousarray(crops[:, :, ::-1])
            vectors = l2_normalize(vectors + self.embedder.embed(mirrored))
        return vectors

    def embed_groups(self, groups: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The crops of many images embedded in one call, given back per image:
        one (N_i, H, W, 3) array per image in, one (N_i, dim) array per image out."""
        counts = [len(crops) for crops in groups]
        if sum(counts) == 0:
            return [np.zeros((0, self.dim), dtype=np.float32) for _ in groups]
        vectors = self.embed_crops(np.concatenate([crops for crops in groups if len(crops)]))
        return np.split(vectors, np.cumsum(counts)[:-1])

    def warm_up(self) -> dict[str, float]:
        """Load every stage's model now, by running each stage once on synthetic input:
        the detector on a blank image, the landmarks on a made-up detection, the embedder
        on a blank crop of its size. Returns the seconds each stage took.

        Searching a blank image is not enough: no face is found, so the landmark and
        embedding models would still load on the first real query (about 3 s). Backends
        that load one model per thread (dlib's) are warmed for the calling thread only.
        """
        timings: dict[str, float] = {}
        blank = np.zeros((160, 160, 3), dtype=np.uint8)
        start = time.perf_counter()
        self.detector.detect(blank)
        timings["detector"] = time.perf_counter() - start
        box = np.array([30.0, 30.0, 130.0, 130.0])
        points = box[:2] + (box[2:] - box[:2]) * np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]])
        start = time.perf_counter()
        self.landmarker.landmarks(blank, [Detection(box=tuple(box), score=1.0, landmarks=points)])
        timings["landmarks"] = time.perf_counter() - start
        width, height = self.embedder.crop.size
        start = time.perf_counter()
        self.embed_crops(np.zeros((1, height, width, 3), dtype=np.uint8))
        timings["embedder"] = time.perf_counter() - start
        log.debug("pipeline warmed up: %s", {stage: round(s, 3) for stage, s in timings.items()})
        return timings

    # ------------------------------------------------------------------ whole
    def __call__(self, image: np.ndarray) -> list[Face]:
        return self.batch([image])[0]

    def batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """Faces of many images; the crops of all of them are embedded in one call."""
        detections = [self.detect(image) for image in images]
        vectors = self.embed_groups([self.crops(image, dets) for image, dets in zip(images, detections)])
        return [[Face(i, d, v[i]) for i, d in enumerate(dets)] for dets, v in zip(detections, vectors)]

    def resolved_config(self) -> PipelineConfig:
        """This pipeline's config with every backend option spelled out, so that
        a gallery keeps its settings when a backend's defaults change."""
        return PipelineConfig.from_dict(
            {
                **self.config.to_dict(),
                "detector_options": {**_options(self.detector), **self.config.detector_options},
                "landmarks_options": {**_options(self.landmarker), **self.config.landmarks_options},
                "embedder_options": {**_options(self.embedder), **self.config.embedder_options},
            }
        )

    def describe(self) -> dict[str, Any]:
        """Backends, versions and settings, for gallery.json."""

        def stage(backend: Any) -> dict[str, Any]:
            info = {"name": backend.name, "version": backend.version()}
            info.update(backend.describe())
            return info

        return {
            "config": self.config.to_dict(),
            "detector": stage(self.detector),
            "landmarks": stage(self.landmarker),
            "embedder": {**stage(self.embedder), "dim": self.dim},
        }
