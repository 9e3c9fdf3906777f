"""The face pipeline: detect, find 5 landmarks, align, embed.

Plain functions for the common case; :class:`FacePipeline` for control.
"""

from embedder.api import cosine_similarity, face_detections, face_embeddings, face_landmarks, face_locations
from embedder.align import ARCFACE_112, AlignTemplate, align_face
from embedder.geometry import estimate_similarity
from embedder.pipeline import FacePipeline, PipelineConfig
from embedder.registry import UnknownBackendError, available, create, register
from embedder.types import LANDMARK_NAMES, Detection, Face

__all__ = [
    "ARCFACE_112",
    "AlignTemplate",
    "Detection",
    "Face",
    "FacePipeline",
    "LANDMARK_NAMES",
    "PipelineConfig",
    "UnknownBackendError",
    "align_face",
    "cosine_similarity",
    "face_detections",
    "face_embeddings",
    "face_landmarks",
    "face_locations",
    "available",
    "create",
    "estimate_similarity",
    "register",
]
