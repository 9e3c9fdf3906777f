"""k nearest gallery faces for every face of a query image."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from embedder.pipeline import FacePipeline, PipelineConfig
from embedder.types import Face
from facesearch.errors import ConfigurationError
from indexer import ann
from search.calibration import Verdict
from search.gallery import Gallery, GalleryError

log = logging.getLogger(__name__)

#: faiss (1.15) uses BLAS for exact search only from this many queries at once
#: (its default is 128000), and its scalar loop is ~10x slower below that.
FAISS_BLAS_THRESHOLD = 16
#: batches from this many queries use every core; smaller ones one core each (BENCHMARKS.md, issue 13)
BATCH_THREADS_FROM = 16


def configure_faiss() -> None:
    """A process-wide faiss switch, set once where a searching process starts (the
    face-search CLI, the service); Python users searching large batches call it too."""
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

    @property
    def pipeline(self) -> FacePipeline:
        if self._pipeline is None:
            config = self.gallery.info.pipeline_config
            if config is None:
                raise GalleryError(f"{self.gallery.directory}: gallery.json does not record its pipeline")
            self._pipeline = FacePipeline(PipelineConfig.from_dict(dict(config)))
        if self._pipeline.dim != self.gallery.dim:
            raise GalleryError(
                f"the query pipeline gives {self._pipeline.dim}-D embeddings, the gallery holds {self.gallery.dim}-D"
            )
        return self._pipeline

    def search(self, image: np.ndarray, k: int = 8, gallery: Gallery | None = None) -> list[FaceResult]:
        """Every face of ``image`` (largest first) with its k nearest gallery faces.
        gallery: a snapshot of ``self.gallery`` to answer from (default: the current one)."""
        gallery = gallery or self.gallery
        faces = self.pipeline(image)
        if not faces:
            return []
        matches = self._search_vectors(gallery, np.stack([f.embedding for f in faces]), k)
        return [FaceResult(face, tuple(m)) for face, m in zip(faces, matches)]

    def refresh(self) -> bool:
        """Load the gallery again if another process changed it (a new generation in
        gallery.json). Searches running meanwhile finish on the gallery they started
        with. Returns True when a new generation was loaded."""
        current = self.gallery
        try:
            generation = current.layout.read_info().generation
        except GalleryError as err:
            log.warning("cannot read %s (%s); still serving generation %d", current.directory, err, current.generation)
            return False
        if generation == current.generation:
            return False
        fresh = Gallery.load(current.directory)
        if fresh.info.pipeline_config != current.info.pipeline_config:
            self._pipeline = None  # rebuilt on the next image search
        self.gallery = fresh
        log.info("gallery %s: generation %d -> %d (%d faces)", current.directory, current.generation,
                 fresh.generation, len(fresh))
        return True

    def search_vectors(self, vectors: np.ndarray | Sequence[Sequence[float]], k: int = 8,
                       gallery: Gallery | None = None) -> list[list[Match]]:
        """k nearest gallery faces of each row of ``vectors`` (normalised here).
        ConfigurationError (422 over HTTP) for rows that are ragged, of another dimension,
        not finite or all zeros (a zero vector has no direction: its matches would be arbitrary)."""
        return self._search_vectors(gallery or self.gallery, vectors, k)

    @staticmethod
    def _search_vectors(gallery: Gallery, vectors: np.ndarray | Sequence[Sequence[float]], k: int) -> list[list[Match]]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigurationError(f"k must be a positive integer, got {k!r}")
        queries = unit_queries(vectors, gallery.dim)
        if len(queries) == 0 or len(gallery) == 0:
            return [[] for _ in range(len(queries))]
        # a few queries: one core each, no OpenMP start-up or contention; batches: every core
        threads = 1 if len(queries) < BATCH_THREADS_FROM else (os.cpu_count() or 1)
        scores, ids = ann.search(gallery.index, gallery.search_settings, queries, int(min(k, len(gallery))),
                                 gallery.store, gallery.positions, threads=threads)
        found = ids >= 0
        rows = gallery.positions(np.where(found, ids, gallery.face_ids[0] if len(gallery) else 0))
        meta = gallery.meta
        flat_rows = rows.reshape(-1)
        paths = meta.column("path").take(flat_rows).to_pylist()
        identities = meta.column("identity").take(flat_rows).to_pylist()
        boxes = meta.column("box").take(flat_rows).to_pylist()
        face_indices = meta.column("face_index").take(flat_rows).to_pylist()
        calibration = gallery.calibration
        out = []
        width = ids.shape[1]
        for q in range(len(queries)):
            matches = []
            for j in range(width):
                if not found[q, j]:
                    continue
                at, cosine = q * width + j, float(scores[q, j])
                matches.append(Match(
                    face_id=int(ids[q, j]), cosine=cosine, identity=identities[at], path=paths[at],
                    box=tuple(boxes[at]), face_index=int(face_indices[at]),
                    verdict=calibration.verdict(cosine) if calibration is not None else None,
                ))
            out.append(matches)
        return out


def unit_queries(vectors: np.ndarray | Sequence[Sequence[float]], dim: int) -> np.ndarray:
    """``vectors`` as (n, dim) float32 rows of unit length; ConfigurationError naming the first bad row.

    Normalised in float64 after scaling each row by its largest magnitude, so that neither
    tiny (1e-30) nor huge (1e30) but finite numbers underflow or overflow to a zero vector.
    """
    try:
        raw = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ConfigurationError(_not_a_matrix(vectors, dim)) from err
    if raw.ndim == 1:
        raw = raw[None, :]
    if raw.ndim != 2 or raw.shape[1] != dim:
        raise ConfigurationError(f"query vectors must be (n, {dim}), got {raw.shape}")
    if len(raw) == 0:
        return raw.astype(np.float32)
    not_finite = np.flatnonzero(~np.isfinite(raw).all(axis=1))
    if len(not_finite):
        raise ConfigurationError(f"vectors[{not_finite[0]}] contains NaN or infinity")
    peak = np.abs(raw).max(axis=1)
    zero = np.flatnonzero(peak == 0)
    if len(zero):
        raise ConfigurationError(f"vectors[{zero[0]}] is all zeros: it has no direction to search by")
    scaled = raw / peak[:, None]
    return (scaled / np.linalg.norm(scaled, axis=1, keepdims=True)).astype(np.float32)


def _not_a_matrix(vectors: object, dim: int) -> str:
    """Why ``vectors`` is not an (n, dim) array of numbers, naming the first ragged row when there is one."""
    rows = vectors if isinstance(vectors, (list, tuple)) else None
    if rows and all(isinstance(r, (list, tuple, np.ndarray)) for r in rows):
        for i, row in enumerate(rows):
            if len(row) != len(rows[0]):
                return f"vectors[{i}] has length {len(row)}, vectors[0] has length {len(rows[0])}; each must have {dim}"
    return f"query vectors must be numbers of shape (n, {dim})"
