"""Every index type checked against exact brute force on seeded data."""

from __future__ import annotations

import numpy as np
import pytest

from facesearch.errors import ConfigurationError
from indexer.build import make_index
from search.searcher import configure_faiss


def _data(n: int, d: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Clustered, like faces of people: 200 centres with spread.
    centres = rng.normal(size=(200, d))
    base = centres[rng.integers(0, 200, n)] + 0.6 * rng.normal(size=(n, d))
    queries = centres[rng.integers(0, 200, 100)] + 0.6 * rng.normal(size=(100, d))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(base), norm(queries)


def _brute(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def test_flat_is_exact():
    configure_faiss()
    base, queries = _data(5000)
    index, _ = make_index("flat", base)
    scores, ids = index.search(queries, 10)
    truth = _brute(base, queries, 10)
    assert (ids == truth).mean() > 0.999  # ties aside, identical
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, truth, 1), atol=1e-5)


@pytest.mark.parametrize("kind,min_recall", [("hnsw", 0.95), ("ivf", 0.85)])
def test_approximate_indexes_against_brute_force(kind, min_recall):
    base, queries = _data(20000, seed=1)
    index, settings = make_index(kind, base)
    _, ids = index.search(queries, 10)
    truth = _brute(base, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= min_recall, (kind, recall, settings)


def test_unknown_index_type():
    with pytest.raises(ConfigurationError, match="unknown index type"):
        make_index("lsh", np.zeros((3, 8), np.float32))
