"""Every index kind, the re-ranking path and the tuning checked against exact brute force on seeded data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from facesearch.errors import ConfigurationError
from indexer import ann
from indexer.build import make_index


def _data(n: int, d: int = 128, seed: int = 0, queries: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Clustered, like faces of people: 200 centres with spread.
    centres = rng.normal(size=(200, d))
    base = centres[rng.integers(0, 200, n)] + 0.6 * rng.normal(size=(n, d))
    asked = centres[rng.integers(0, 200, queries)] + 0.6 * rng.normal(size=(queries, d))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(base), norm(asked)


def _brute(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def test_flat_is_exact():
    base, queries = _data(5000)
    index, settings = make_index("flat", base)
    scores, ids = ann.search(index, settings, queries, 10)
    truth = _brute(base, queries, 10)
    assert (ids == truth).mean() > 0.999  # ties aside, identical
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, truth, 1), atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivf-sq4"])
def test_tuned_indexes_reach_their_target_against_brute_force(kind, tmp_path):
    """Tune on gallery vectors, then check on fresh queries: recall@10 against brute force."""
    base, queries = _data(20000, seed=1)
    ids = np.arange(20000, dtype=np.int64) * 3 + 5  # face ids are not row numbers
    p = ann.plan(kind, len(base), base.shape[1])
    index = ann.new_index(p)
    if p.trains:
        index.train(base[:10000])
    index.add_with_ids(base, ids)
    store = None
    if ann.needs_vectors_file(kind):
        (tmp_path / "v.f32").write_bytes(base.tobytes())
        store = ann.VectorStore(tmp_path / "v.f32", base.shape[1])
    rows_of = lambda found: (found - 5) // 3  # noqa: E731
    tune_queries = base[np.random.default_rng(2).choice(20000, 300, replace=False)]
    truth = ann.ExactTopK(tune_queries, 10)
    for start in range(0, 20000, 4096):  # streamed, as a build does
        truth.update(ids[start:start + 4096], base[start:start + 4096])
    np.testing.assert_array_equal(truth.ids, ids[_brute(base, tune_queries, 10)])
    tuning = ann.tune(kind, index, tune_queries, truth.ids, 10, 0.95, store, rows_of)
    assert tuning.recall >= 0.95, tuning
    _, found = ann.search(index, tuning.settings, queries, 10, store, rows_of)
    recall = ann.recall_at_k(found, ids[_brute(base, queries, 10)])
    assert recall >= 0.9, (kind, recall, tuning.settings)
    if kind == "ivf-sq4":  # without re-ranking, the codes alone are clearly worse
        plain = {k: v for k, v in tuning.settings.items() if k != "rerank"}
        _, coarse = ann.search(index, plain, queries, 10)
        assert ann.recall_at_k(coarse, ids[_brute(base, queries, 10)]) < recall


def test_rerank_returns_exact_scores_of_candidates(tmp_path):
    base, queries = _data(3000, seed=4)
    (tmp_path / "v.f32").write_bytes(base.tobytes())
    store = ann.VectorStore(tmp_path / "v.f32", 128)
    candidates = _brute(base, queries, 50)[:, ::-1].copy()  # the right ones, in the wrong order
    scores, ids = ann.rerank(queries, candidates, 5, store, lambda x: x)
    np.testing.assert_array_equal(ids, _brute(base, queries, 5))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ base.T, ids, 1), atol=1e-5)


def test_auto_choice_by_size():
    assert ann.choose("auto", 10_000, 128) == "flat"
    assert ann.choose("auto", ann.FLAT_MAX + 1, 128) == "hnsw"
    assert ann.choose("auto", ann.HNSW_MAX + 1, 128) == "ivf"
    assert ann.choose("auto", 10_000_000, 128) == "ivf-sq4"
    assert ann.choose("hnsw", 10, 128) == "hnsw"
    with pytest.raises(ConfigurationError, match="unknown index type"):
        ann.choose("lsh", 10, 128)


def test_unknown_index_type():
    with pytest.raises(ConfigurationError, match="unknown index type"):
        make_index("lsh", np.zeros((3, 8), np.float32))


@pytest.mark.needs_data
@pytest.mark.parametrize("kind", ["hnsw", "ivf-sq4"])
def test_stored_recall_matches_a_recomputation(celeba_gallery, tmp_path, kind):
    """A real gallery rebuilt with an approximate index: the recall gallery.json states is what
    check-recall measures again, and search still finds each face itself."""
    from indexer.cli import main as face_index
    from search import Gallery, Searcher
    from search.recall import check_recall

    gallery = tmp_path / "g"
    shutil.copytree(celeba_gallery[0], gallery)
    result = CliRunner().invoke(face_index, ["build", str(gallery), "--index", kind, "--target-recall", "0.97"])
    assert result.exit_code == 0, (result.output, result.exception)
    info = json.loads((gallery / "gallery.json").read_text())
    tuning = info["index"]["tuning"]
    assert info["index"]["type"] == kind and tuning["recall"] >= 0.97 and tuning["target_recall"] == 0.97
    again = check_recall(gallery)
    assert again["sample"] == tuning["sample"] and abs(again["recall"] - tuning["recall"]) <= 0.02
    shown = CliRunner().invoke(face_index, ["check-recall", str(gallery)])
    assert shown.exit_code == 0 and "recall@8" in shown.output and "held-out" in shown.output
    g = Gallery.load(gallery)
    hits = Searcher(g).search_vectors(g.embeddings()[:50], k=1)
    assert sum(r[0].face_id == f for r, f in zip(hits, g.face_ids[:50])) >= 48


def test_the_nprobe_ladder_ends_with_a_scan_of_every_list():
    """A small IVF index (7 lists) must be able to reach its exhaustive setting: a ladder
    cut at the last step below nlist stopped at nprobe 4 of 7 and missed recall 0.97."""
    assert ann._probes(7) == [1, 2, 4, 7]
    assert ann._probes(16) == [1, 2, 4, 8, 12, 16]
    assert ann._probes(1) == [1]
    assert ann._probes(3162)[-1] == 3162 and ann._probes(3162)[-2] == 2048
