"""The index a gallery gets, chosen by its size, built in bounded memory, tuned to a recall.

Kinds (``--index``):

- ``flat``: exact. One query costs O(N); on one core it stays under 1.5 ms up to
  about FLAT_MAX faces (BENCHMARKS.md), so ``auto`` keeps it that far.
- ``hnsw``: a graph (M=32), answers in about a millisecond at 200k faces; its
  ``efSearch`` is tuned at build time. Memory: the float vectors plus the graph.
- ``ivf``: inverted lists of float vectors (nlist ~ 4 sqrt N, k-means trained on a
  sample); ``nprobe`` is tuned.
- ``ivf-sq4``: inverted lists of 4-bit scalar-quantised codes (dim/2 bytes a face, an
  eighth of the floats), for galleries whose float vectors do not fit in memory
  comfortably (over IN_MEMORY_MAX_BYTES). Product quantisation was tried: its
  training took 50 s for 10k vectors on one core, and SQ4 with re-ranking reached
  the same recall (BENCHMARKS.md). The top candidates are re-ranked exactly against the float
  vectors, memory-mapped from ``vectors-GGGGGG.f32`` on disk; ``nprobe`` and the
  re-rank depth are tuned.

``auto`` (the default) picks flat up to FLAT_MAX faces, hnsw up to HNSW_MAX, ivf while
the float vectors stay under IN_MEMORY_MAX_BYTES, ivf-sq4 beyond.

Tuning: a seeded sample of the gallery's own vectors is searched exactly (streamed
over the parts while they are added) and with the index at growing efSearch /
nprobe / re-rank depth; the smallest setting whose recall@k reaches the target is
kept, with the measured recall, in gallery.json.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facesearch.errors import ConfigurationError

log = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivf-sq4")
#: exact search answers one query in <= 1.5 ms on one core up to here (BENCHMARKS.md, issue 13)
FLAT_MAX = 60_000
#: the graph's build time grows past a few minutes on 2 cores beyond this (BENCHMARKS.md, issue 13)
HNSW_MAX = 500_000
#: float32 vectors up to this size stay in memory (ivf); beyond, codes + re-ranking from disk (ivf-sq4)
IN_MEMORY_MAX_BYTES = 2 * 2**30
#: vectors sampled to train k-means / product quantisers, and queries sampled to tune
TRAIN_SAMPLE = 100_000
TUNE_QUERIES = 1_000
TUNE_SEED = 1
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
RERANK_LADDER = (32, 64, 128, 256)


def choose(index_type: str, n: int, dim: int) -> str:
    """The concrete kind for ``index_type`` ("auto" or a kind) and a gallery of ``n`` faces."""
    if index_type not in INDEX_TYPES:
        raise ConfigurationError(f"unknown index type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if index_type != "auto":
        return index_type
    if n <= FLAT_MAX:
        return "flat"
    if n <= HNSW_MAX:
        return "hnsw"
    return "ivf" if n * dim * 4 <= IN_MEMORY_MAX_BYTES else "ivf-sq4"


def needs_vectors_file(kind: str) -> bool:
    return kind == "ivf-sq4"


@dataclass
class IndexPlan:
    """What to build: the kind, its construction parameters and whether it trains."""

    kind: str
    dim: int
    n: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        return self.kind in ("ivf", "ivf-sq4")


def plan(kind: str, n: int, dim: int) -> IndexPlan:
    if kind == "hnsw":
        return IndexPlan(kind, dim, n, {"M": 32, "efConstruction": 80})
    if kind in ("ivf", "ivf-sq4"):
        # lists of ~sqrt(N) vectors (2 sqrt N lists for floats, sqrt N for codes): assigning N vectors
        # costs N x nlist dot products, the build's largest cost; nprobe is tuned afterwards
        scale = 2.0 if kind == "ivf" else 1.0
        nlist = max(1, min(int(scale * math.sqrt(max(n, 1))), max(1, n // 39), 65536))
        params: dict[str, Any] = {"nlist": nlist}
        return IndexPlan(kind, dim, n, params)
    return IndexPlan(kind, dim, n)


def new_index(p: IndexPlan) -> Any:
    """An empty index for ``p``; flat and hnsw wrapped in IndexIDMap2 (face ids), ivf kinds keep ids natively."""
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT
    if p.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(p.dim))
    if p.kind == "hnsw":
        inner = faiss.IndexHNSWFlat(p.dim, p.params["M"], metric)
        inner.hnsw.efConstruction = p.params["efConstruction"]
        return faiss.IndexIDMap2(inner)
    if p.kind in ("ivf", "ivf-sq4"):
        index = faiss.index_factory(p.dim, f"IVF{p.params['nlist']},{'Flat' if p.kind == 'ivf' else 'SQ4'}", metric)
        faiss.extract_index_ivf(index).cp.niter = 10  # k-means converges well before faiss's 25 on face vectors
        return index
    raise ConfigurationError(f"unknown index kind {p.kind!r}")


def default_search_settings(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    if kind == "hnsw":
        return {"efSearch": 128}
    if kind == "ivf":
        return {"nprobe": max(1, params["nlist"] // 16)}
    if kind == "ivf-sq4":
        return {"nprobe": max(1, params["nlist"] // 16), "rerank": 128}
    return {}


# --- searching --------------------------------------------------------------------------

def search_params(settings: dict[str, Any]) -> Any:
    """Per-call faiss search parameters (thread-safe: nothing is set on the shared index).
    ``settings["_exclude"]``: face ids left out of this search (an IDSelector)."""
    import faiss

    extra: dict[str, Any] = {}
    if settings.get("_exclude") is not None:
        batch = faiss.IDSelectorBatch(np.ascontiguousarray(settings["_exclude"], dtype=np.int64))
        extra["sel"] = faiss.IDSelectorNot(batch)
        extra["_keep"] = batch  # the selector refers to it: keep it alive for the call
    if "efSearch" in settings:
        params = faiss.SearchParametersHNSW(efSearch=int(settings["efSearch"]))
    elif "nprobe" in settings:
        params = faiss.SearchParametersIVF(nprobe=int(settings["nprobe"]))
    elif extra:
        params = faiss.SearchParameters()
    else:
        return None
    if extra:
        params.sel = extra["sel"]
        params._keep = (extra["_keep"], extra["sel"])
    return params


class VectorStore:
    """Float vectors by manifest row, memory-mapped from a generation's vectors file (re-ranking)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.vectors = np.memmap(path, dtype=np.float32, mode="r").reshape(-1, dim)

    def __len__(self) -> int:
        return len(self.vectors)


def search(index: Any, settings: dict[str, Any], queries: np.ndarray, k: int,
           store: VectorStore | None = None, rows_of: Any = None, threads: int | None = None,
           exclude: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, face ids) of the k best of each query; -1 ids where fewer exist.

    With ``settings["rerank"]`` and a ``store``, the index's ``rerank`` best candidates are
    re-scored exactly from the float vectors (``rows_of(face_ids)`` gives their rows).
    threads: OpenMP threads for this call (single queries run best on one; see BENCHMARKS.md).
    exclude: per query, face ids the index must not return, or None (tuning's strangers).
    """
    import faiss

    if threads is not None:
        faiss.omp_set_num_threads(threads)  # per calling thread: concurrent requests do not interfere
    if exclude is not None and any(ids is not None for ids in exclude):
        plain = [q for q, ids in enumerate(exclude) if ids is None]
        scores = np.full((len(queries), k), -np.inf, np.float32)
        found = np.full((len(queries), k), -1, np.int64)
        if plain:
            got = search(index, settings, queries[plain], k, store, rows_of)
            scores[plain], found[plain] = got[0][:, :k], got[1][:, :k]
        for q, ids in enumerate(exclude):
            if ids is not None:
                got = search(index, {**settings, "_exclude": ids}, queries[q:q + 1], k, store, rows_of)
                scores[q], found[q] = got[0][0], got[1][0]
        return scores, found
    params = search_params(settings)
    depth = int(settings.get("rerank", 0) or 0)
    if store is None or depth <= k:
        scores, ids = index.search(queries, k, params=params) if params is not None else index.search(queries, k)
        return scores, ids
    _, candidates = index.search(queries, depth, params=params)
    return rerank(queries, candidates, k, store, rows_of)


def rerank(queries: np.ndarray, candidates: np.ndarray, k: int, store: VectorStore, rows_of: Any,
           chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of the candidate face ids from the float vectors; the k best of each query."""
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(queries), chunk):
        cand = candidates[start:start + chunk]
        valid = cand >= 0
        rows = np.zeros(cand.shape, np.int64)
        if valid.any():
            rows[valid] = np.asarray(rows_of(cand[valid]))
        vectors = store.vectors[rows.reshape(-1)].reshape(*cand.shape, -1)
        exact = np.einsum("qcd,qd->qc", vectors, queries[start:start + chunk])
        exact[~valid] = -np.inf
        best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(exact, best, axis=1)
        found = np.take_along_axis(cand, best, axis=1)
        found[~np.isfinite(top)] = -1
        width = best.shape[1]
        scores[start:start + chunk, :width] = top
        ids[start:start + chunk, :width] = found
    return scores, ids


# --- exact ground truth, streamed --------------------------------------------------------

class ExactTopK:
    """The exact top-k face ids of a few queries over vectors that arrive part by part.

    Held-out queries: a query with ``self_ids[q] >= 0`` never matches that face id (a
    new photo of someone in the gallery); one with ``groups[q] >= 0`` never matches a
    row of that group (identity): a stranger's query."""

    CHUNK = 8192

    def __init__(self, queries: np.ndarray, k: int, self_ids: np.ndarray | None = None,
                 groups: np.ndarray | None = None) -> None:
        self.queries = np.ascontiguousarray(queries, np.float32)
        self.k = k
        n = len(self.queries)
        self.self_ids = np.full(n, -1, np.int64) if self_ids is None else np.asarray(self_ids, np.int64)
        self.groups = np.full(n, -1, np.int64) if groups is None else np.asarray(groups, np.int64)
        self.scores = np.full((n, k), -np.inf, np.float32)
        self.ids = np.full((n, k), -1, np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray, groups: np.ndarray | None = None) -> None:
        if not len(ids) or not len(self.queries):
            return
        for start in range(0, len(ids), self.CHUNK):
            part_ids = ids[start:start + self.CHUNK]
            scores = self.queries @ vectors[start:start + self.CHUNK].T
            mask = part_ids[None, :] == self.self_ids[:, None]
            if groups is not None:
                mask |= (groups[start:start + self.CHUNK][None, :] == self.groups[:, None]) & (self.groups[:, None] >= 0)
            scores[mask] = -np.inf
            take = min(self.k, scores.shape[1])
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            all_scores = np.concatenate([self.scores, np.take_along_axis(scores, top, axis=1)], axis=1)
            all_ids = np.concatenate([self.ids, part_ids[top]], axis=1)
            keep = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
            self.scores = np.take_along_axis(all_scores, keep, axis=1)
            self.ids = np.where(np.isfinite(self.scores), np.take_along_axis(all_ids, keep, axis=1), -1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k ids that the index returned in its top k (ids -1 ignored)."""
    hits = total = 0
    for f, t in zip(found, truth):
        want = set(t[t >= 0].tolist())
        hits += len(want & set(f.tolist()))
        total += len(want)
    return hits / total if total else 1.0


@dataclass(frozen=True)
class Tuning:
    settings: dict[str, Any]
    recall: float
    k: int
    sample: int
    target: float

    def to_dict(self) -> dict[str, Any]:
        return {"target_recall": self.target, "recall": round(self.recall, 4), "k": self.k, "sample": self.sample,
                "settings": dict(self.settings)}


def _probes(nlist: int) -> list[int]:
    """The nprobe ladder of an index of ``nlist`` lists, ending with all of them (a scan of
    every list: the most an IVF index can give, which a ladder cut at nlist would miss
    when nlist is not one of its steps)."""
    return [p for p in NPROBE_LADDER if p < nlist] + [max(1, int(nlist))]


def tune(kind: str, index: Any, queries: np.ndarray, truth: np.ndarray, k: int, target: float,
         store: VectorStore | None = None, rows_of: Any = None, exclude: Sequence[np.ndarray | None] | None = None) -> Tuning:
    """The cheapest search setting whose recall@k against exact search reaches ``target``
    (the best tried when none does; the measured recall says so).

    Recall grows with efSearch / nprobe, so each ladder is climbed from its cheap end and
    stops at the first setting that reaches the target (the steps grow about 1.5x, so the
    climb costs about three final measurements); for ivf-sq4, each re-rank depth gets its
    smallest nprobe, and the fastest pair wins."""
    import time

    strangers = np.array([ids is not None for ids in exclude], bool) if exclude is not None else np.zeros(len(queries), bool)

    def measure(settings: dict[str, Any]) -> float:
        """The recall of the harder group: strangers' queries (their identity left out) and
        new photos of gallery people must each reach the target."""
        _, ids = search(index, settings, queries, k, store, rows_of, exclude=exclude)
        groups = [g for g in (strangers, ~strangers) if g.any()]
        return min(recall_at_k(ids[g], truth[g]) for g in groups)

    if kind == "flat":
        return Tuning({}, measure({}), k, len(queries), target)
    if kind == "hnsw":
        ladders = [[{"efSearch": max(ef, k)} for ef in EF_LADDER]]
    elif kind == "ivf":
        ladders = [[{"nprobe": p} for p in _probes(index.nlist)]]
    else:
        probes = _probes(index.nlist)
        ladders = [[{"nprobe": p, "rerank": r} for p in probes] for r in RERANK_LADDER if r > k]
    best: tuple[dict[str, Any], float] | None = None
    reached: list[tuple[float, dict[str, Any], float]] = []
    limit = None  # a deeper re-rank never needs more lists than a shallower one did
    for ladder in ladders:
        for position, settings in enumerate(ladder):
            if limit is not None and position > limit:
                break
            recall = measure(settings)
            if best is None or recall > best[1]:
                best = (settings, recall)
            if recall >= target:
                start = time.perf_counter()
                measure(settings)
                reached.append((time.perf_counter() - start, settings, recall))
                limit = position
                break
    if reached:
        _, settings, recall = min(reached, key=lambda r: r[0])
        log.info("tuned %s: %s gives recall@%d %.4f (target %.2f)", kind, settings, k, recall, target)
        return Tuning(settings, recall, k, len(queries), target)
    assert best is not None
    log.warning("%s: no setting reached recall@%d %.2f; best %s at %.4f", kind, k, target, best[0], best[1])
    return Tuning(best[0], best[1], k, len(queries), target)


def sample_rows(counts: Sequence[int], size: int, seed: int = 0) -> list[np.ndarray]:
    """A seeded uniform sample of ``size`` rows over parts of ``counts`` rows: sorted row numbers per part."""
    total = int(sum(counts))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False)) if total else np.zeros(0, np.int64)
    out, start = [], 0
    for c in counts:
        lo, hi = np.searchsorted(chosen, [start, start + c])
        out.append(chosen[lo:hi] - start)
        start += c
    return out
