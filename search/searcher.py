"""k nearest gallery faces for every face of a query image."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from embedder.pipeline import FacePipeline, PipelineConfig
from embedder.types import Face
from embedder.vectors import l2_normalize
from search.calibration import Verdict
from search.gallery import Gallery, GalleryError

log = logging.getLogger(__name__)

#: faiss (1.15) uses BLAS for exact search only from this many queries at once
#: (its default is 128000), and its scalar loop is ~10x slower below that.
FAISS_BLAS_THRESHOLD = 16


def configure_faiss() -> None:
    import faiss

    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD


@dataclass(frozen=True)
class Match:
    """A gallery face close to the query."""

    face_id: int
    cosine: float
    identity: str | None
    path: str
    box: tuple[float, float, float, float]
    face_index: int
    verdict: Verdict | None = None  # same / uncertain / different by the gallery's calibration; None if uncalibrated

    def to_dict(self) -> dict[str, Any]:
        return {
            "face_id": self.face_id, "cosine": round(self.cosine, 6), "identity": self.identity,
            "path": self.path, "box": [round(v, 2) for v in self.box], "face_index": self.face_index,
            "verdict": self.verdict,
        }


@dataclass(frozen=True, eq=False)
class FaceResult:
    """One face of the query image and its nearest gallery faces, best first."""

    face: Face
    matches: tuple[Match, ...]

    def to_dict(self) -> dict[str, Any]:
        det = self.face.detection
        return {
            "face_index": self.face.face_index,
            "box": [round(v, 2) for v in det.box],
            "score": round(det.score, 4),
            "landmarks": np.round(det.landmarks, 2).tolist() if det.landmarks is not None else None,
            "matches": [m.to_dict() for m in self.matches],
        }


class Searcher:
    """Search a gallery by image or by vector.

    The query pipeline is the gallery's own (from gallery.json), so queries
    and gallery are embedded the same way; pass ``pipeline`` to override.
    """

    def __init__(self, gallery: Gallery | str, pipeline: FacePipeline | None = None) -> None:
        self.gallery = gallery if isinstance(gallery, Gallery) else Gallery.load(gallery)
        self._pipeline = pipeline
        configure_faiss()

    @property
    def pipeline(self) -> FacePipeline:
        if self._pipeline is None:
            config = self.gallery.info.get("pipeline", {}).get("config")
            if config is None:
                raise GalleryError(f"{self.gallery.directory}: gallery.json does not record its pipeline")
            self._pipeline = FacePipeline(PipelineConfig.from_dict(config))
        if self._pipeline.dim != self.gallery.dim:
            raise GalleryError(
                f"the query pipeline gives {self._pipeline.dim}-D embeddings, the gallery holds {self.gallery.dim}-D"
            )
        return self._pipeline

    def search(self, image: np.ndarray, k: int = 8) -> list[FaceResult]:
        """Every face of ``image`` (largest first) with its k nearest gallery faces."""
        faces = self.pipeline(image)
        if not faces:
            return []
        matches = self.search_vectors(np.stack([f.embedding for f in faces]), k)
        return [FaceResult(face, tuple(m)) for face, m in zip(faces, matches)]

    def search_vectors(self, vectors: np.ndarray | Sequence[Sequence[float]], k: int = 8) -> list[list[Match]]:
        """k nearest gallery faces of each row of ``vectors`` (normalised here)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.gallery.dim:
            raise ValueError(f"query vectors must be (n, {self.gallery.dim}), got {queries.shape}")
        if len(queries) == 0 or len(self.gallery) == 0:
            return [[] for _ in range(len(queries))]
        if not np.isfinite(queries).all():
            raise ValueError("query vectors contain NaN or infinity")
        scores, ids = self.gallery.index.search(l2_normalize(queries), int(min(k, len(self.gallery))))
        meta = self.gallery.meta
        paths = meta.column("path")
        identities = meta.column("identity")
        boxes = meta.column("box")
        face_indices = meta.column("face_index")
        calibration = self.gallery.calibration
        out = []
        for row_scores, row_ids in zip(scores, ids):
            out.append(
                [
                    Match(
                        face_id=int(i), cosine=float(s), identity=identities[int(i)].as_py(), path=paths[int(i)].as_py(),
                        box=tuple(boxes[int(i)].as_py()), face_index=int(face_indices[int(i)].as_py()),
                        verdict=calibration.verdict(float(s)) if calibration is not None else None,
                    )
                    for s, i in zip(row_scores, row_ids)
                    if i >= 0
                ]
            )
        return out
