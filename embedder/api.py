"""A handful of plain functions for the common case, face_recognition style.

Each takes an RGB uint8 image (``data.load_image``) and uses one shared
default pipeline per process, built on first use. Empty in, empty out.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from embedder.pipeline import FacePipeline
from embedder.types import Detection


@lru_cache(maxsize=8)
def _pipeline(flip: bool = False, upsample: int | str | None = None) -> FacePipeline:
    options = {} if upsample is None else {"upsample": upsample}
    return FacePipeline(flip=flip, detector_options=options)


def face_locations(image: np.ndarray, upsample: int | str | None = None) -> list[tuple[float, float, float, float]]:
    """Boxes (x1, y1, x2, y2) of the faces in ``image``, largest first.

    upsample: None keeps the detector's policy; 1 or 2 find smaller faces, 4x or 16x slower.
    """
    return [d.box for d in _pipeline(upsample=upsample).detect(image)]


def face_landmarks(image: np.ndarray, upsample: int | str | None = None) -> list[np.ndarray]:
    """(5, 2) landmarks per face (left eye, right eye, nose, mouth left, mouth right)."""
    return [d.landmarks for d in _pipeline(upsample=upsample).detect(image)]


def face_detections(image: np.ndarray, upsample: int | str | None = None) -> list[Detection]:
    """Full detections (box, score, landmarks, dlib keypoints), largest first."""
    return _pipeline(upsample=upsample).detect(image)


def face_embeddings(image: np.ndarray, flip: bool = False, upsample: int | str | None = None) -> np.ndarray:
    """(N, 128) L2-normalised embeddings, one row per face, largest first.

    flip: also embed the mirrored face and average; see BENCHMARKS.md for what it buys.
    """
    pipeline = _pipeline(flip=flip, upsample=upsample)
    faces = pipeline(image)
    if not faces:
        return np.zeros((0, pipeline.dim), dtype=np.float32)
    return np.stack([f.embedding for f in faces])


def cosine_similarity(known: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``known`` (N, D) with ``candidate`` (D,): higher is more alike."""
    known = np.asarray(known, dtype=np.float32)
    if known.size == 0:
        return np.zeros((0,), dtype=np.float32)
    known = known.reshape(-1, known.shape[-1])
    a = known / np.maximum(np.linalg.norm(known, axis=1, keepdims=True), 1e-12)
    b = np.asarray(candidate, dtype=np.float32)
    b = b / max(float(np.linalg.norm(b)), 1e-12)
    return a @ b
