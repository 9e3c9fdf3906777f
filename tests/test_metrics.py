"""Metrics against brute force on seeded data, and a case computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from search.metrics import identification, operating_point, roc_curve, ten_fold_accuracy, verification


def _data(n: int = 300, ids: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, ids, n)
    centres = rng.normal(size=(ids, 16))
    x = centres[labels] + 1.2 * rng.normal(size=(n, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _brute_pairs(x, labels):
    s = x @ x.T
    i, j = np.triu_indices(len(x), k=1)
    same = labels[i] == labels[j]
    return s[i, j][same], s[i, j][~same]


def test_verification_equals_brute_force():
    x, labels = _data()
    genuine, impostor = _brute_pairs(x, labels)
    result = verification(x, labels, fprs=(1e-1, 1e-2, 1e-3), chunk=37)  # odd chunk: edges exercised
    assert result.genuine_pairs == len(genuine) and result.impostor_pairs == len(impostor)
    np.testing.assert_allclose(np.sort(result.genuine_scores), np.sort(genuine), atol=1e-6)
    auc = ((genuine[:, None] > impostor[None, :]).sum() + 0.5 * (genuine[:, None] == impostor[None, :]).sum()) / (
        len(genuine) * len(impostor))
    assert result.auc == pytest.approx(auc, abs=1e-9)
    for point in result.points:
        # Brute force: the lowest threshold among impostor scores with FPR <= target.
        for t in np.sort(impostor):
            if np.mean(impostor > t) <= point.target_fpr:
                break
        assert point.threshold == pytest.approx(float(t), abs=1e-6)
        assert point.tpr == pytest.approx(float(np.mean(genuine > t)))
        assert point.fpr <= point.target_fpr
    assert result.genuine_hist.sum() == len(genuine) and result.impostor_hist.sum() == len(impostor)


def test_tpr_at_fpr_by_hand():
    # 10 impostor pairs; FPR 0.2 lets 2 pass: threshold is the 3rd highest impostor (0.5).
    impostor_top = np.array([0.9, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2])
    genuine = np.array([0.95, 0.7, 0.55, 0.5, 0.3])
    point = operating_point(genuine, impostor_top, 10, 0.2)
    assert point.threshold == 0.5
    assert point.tpr == 3 / 5  # 0.95, 0.7, 0.55 are above; 0.5 ties and is rejected
    assert point.fpr == 0.2


def test_identification_equals_brute_force():
    x, labels = _data(n=120, ids=15, seed=3)
    result = identification(x, labels, k=8, chunk=50)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    rank1, aps, queries = 0, [], 0
    for q in range(len(x)):
        possible = int((labels == labels[q]).sum()) - 1
        if not possible:
            continue
        queries += 1
        order = np.argsort(-s[q], kind="stable")[:8]
        hits = labels[order] == labels[q]
        rank1 += hits[0]
        aps.append(sum(hits[: r + 1].mean() for r in range(8) if hits[r]) / min(8, possible))
    assert result["queries"] == queries
    assert result["rank1"] == pytest.approx(rank1 / queries)
    assert result["map@8"] == pytest.approx(np.mean(aps))


def test_ten_fold_accuracy_equals_brute_force():
    rng = np.random.default_rng(5)
    same = rng.random(600) < 0.5
    scores = np.where(same, rng.normal(0.6, 0.2, 600), rng.normal(0.2, 0.2, 600)).round(2)  # ties on purpose
    folds = np.repeat(np.arange(10), 60)
    mean, std, accs, thresholds = ten_fold_accuracy(scores, same, folds)
    for fold in range(10):
        train, test = folds != fold, folds == fold
        c = np.unique(scores[train])
        mids = np.concatenate([[c[0] - 1e-6], (c[:-1] + c[1:]) / 2, [c[-1] + 1e-6]])
        best = mids[int(np.argmax([((scores[train] >= t) == same[train]).mean() for t in mids]))]
        assert thresholds[fold] == pytest.approx(best)
        assert accs[fold] == pytest.approx(((scores[test] >= best) == same[test]).mean())
    assert mean == pytest.approx(np.mean(accs)) and 0.7 < mean < 0.95 and std > 0


def test_roc_curve_ends_at_one():
    x, labels = _data()
    result = verification(x, labels, bins=50)
    fpr, tpr = roc_curve(result)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == pytest.approx(1) and tpr[-1] == pytest.approx(1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
