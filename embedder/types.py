"""Typed, immutable records that flow between the pipeline's stages.

Landmark order (``LANDMARK_NAMES``), fixed everywhere in facesearch, the same
as CelebA's annotation files and insightface's templates: left eye centre,
right eye centre, nose tip, left mouth corner, right mouth corner, where
"left" and "right" are as seen in the image (the left eye is the one with the
smaller x in an upright, frontal face). Coordinates are pixels (x, y) of the
source image, origin at the top-left corner of the top-left pixel's centre.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


def _readonly(array: np.ndarray | None, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    if array is None:
        return None
    out = np.array(array, dtype=np.float32, copy=True)
    if shape is not None and out.shape != shape:
        raise ValueError(f"expected shape {shape}, got {out.shape}")
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Detection:
    """One face found in an image.

    box: (x1, y1, x2, y2) in pixels.
    score: the detector's confidence (scale depends on the detector).
    landmarks: (5, 2) float32 in LANDMARK_NAMES order, or None before the
        landmark stage has run.
    keypoints: the landmark backend's native points, when it has its own
        scheme (dlib-5: outer and inner eye corners and the base of the nose),
        named by ``keypoint_scheme``. Embedders trained on that scheme's
        alignment (dlib's ResNet) use them.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    keypoint_scheme: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "landmarks", _readonly(self.landmarks, (5, 2)))
        object.__setattr__(self, "keypoints", _readonly(self.keypoints))

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def replace(self, **changes: object) -> "Detection":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, eq=False)
class Face:
    """A detected face with its embedding.

    face_index: position of this face within its image (largest face first).
    embedding: L2-normalised float32 vector; cosine similarity = dot product.
    """

    face_index: int
    detection: Detection
    embedding: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "embedding", _readonly(self.embedding))

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.detection.box
