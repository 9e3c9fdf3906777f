"""Face verification and identification metrics, exact, over all pairs, in chunks.

Verification over every pair of an identity-labelled set of embeddings:
genuine pairs (same identity) are few and computed per identity first;
impostor pairs (75M for 12k faces) are never held at once: in one pass, each
chunk of rows sorts its impostor scores and contributes its exact top scores
(enough for the largest FPR asked for), the rank of every genuine score among
them (wins and ties: the exact ROC AUC, Mann-Whitney U), and a histogram (for
plots). Sorting a chunk and searching the few genuine scores in it is ~40x
faster than searching every impostor among the genuine scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OperatingPoint:
    """Accept a pair when its cosine is > threshold. fpr <= target by construction."""

    target_fpr: float
    threshold: float
    tpr: float
    fpr: float


@dataclass(frozen=True, eq=False)
class Verification:
    genuine_pairs: int
    impostor_pairs: int
    auc: float
    points: tuple[OperatingPoint, ...]
    bin_edges: np.ndarray
    genuine_hist: np.ndarray
    impostor_hist: np.ndarray
    genuine_scores: np.ndarray


def operating_point(genuine: np.ndarray, impostor_top: np.ndarray, impostors: int, target_fpr: float) -> OperatingPoint:
    """The lowest threshold whose false-positive rate is at most ``target_fpr``.

    impostor_top: the highest impostor scores, descending, at least
    floor(target_fpr * impostors) + 1 of them.
    """
    allowed = int(np.floor(target_fpr * impostors))  # impostors that may score above the threshold
    if allowed >= len(impostor_top):
        raise ValueError(f"need the top {allowed + 1} impostor scores, got {len(impostor_top)}")
    threshold = float(impostor_top[allowed])
    # Ties with the threshold are rejected, so at most `allowed` impostors pass.
    passed = int(np.count_nonzero(impostor_top[:allowed] > threshold))
    return OperatingPoint(
        target_fpr=target_fpr, threshold=threshold,
        tpr=float(np.mean(genuine > threshold)) if len(genuine) else float("nan"),
        fpr=passed / impostors if impostors else float("nan"),
    )


def verification(
    embeddings: np.ndarray, labels: np.ndarray, fprs: tuple[float, ...] = (1e-2, 1e-3, 1e-4),
    chunk: int = 1024, bins: int = 400,
) -> Verification:
    """Exact verification metrics over all pairs i < j of L2-normalised ``embeddings``."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    n = len(x)
    if n < 2 or len(labels) != n:
        raise ValueError(f"need at least 2 embeddings with one label each, got {n} and {len(labels)}")
    _, codes = np.unique(labels, return_inverse=True)
    counts = np.bincount(codes)
    genuine_total = int((counts * (counts - 1) // 2).sum())
    impostor_total = n * (n - 1) // 2 - genuine_total
    keep = int(np.floor(max(fprs) * impostor_total)) + 1
    edges = np.linspace(-1.0, 1.0, bins + 1)
    genuine_hist = np.zeros(bins, np.int64)
    impostor_hist = np.zeros(bins, np.int64)

    # Genuine scores are few: compute them identity by identity, first, so that
    # one pass over the row chunks serves the impostor top list, histogram and AUC.
    genuine_parts = []
    for code in np.flatnonzero(counts >= 2):
        members = x[codes == code]
        scores = members @ members.T
        genuine_parts.append(scores[np.triu_indices(len(members), k=1)])
    genuine = np.concatenate(genuine_parts) if genuine_parts else np.empty(0, np.float32)
    genuine_hist += np.histogram(genuine, edges)[0]
    sorted_genuine = np.sort(genuine)

    top = np.empty(0, np.float32)
    wins = 0.0  # exact AUC numerator: genuine > impostor counts 1, a tie 1/2
    for start in range(0, n - 1, chunk):
        stop = min(n, start + chunk)
        scores = x[start:stop] @ x[start:].T
        upper = np.triu(np.ones(scores.shape, bool), k=1)  # j > i within the chunk's rows
        impostor = scores[upper & (codes[start:stop, None] != codes[None, start:])]
        impostor = np.sort(impostor)  # sorted, the genuine scores find their ranks in it cheaply
        impostor_hist += np.histogram(impostor, edges)[0]
        below = np.searchsorted(impostor, sorted_genuine, side="left")  # impostors < each genuine score
        ties = np.searchsorted(impostor, sorted_genuine, side="right") - below
        wins += float(below.sum()) + 0.5 * float(ties.sum())
        top = np.concatenate([top, impostor[-keep:]])
        if len(top) > keep:
            top = np.partition(top, len(top) - keep)[-keep:]
    top = np.sort(top)[::-1]
    auc = wins / (len(genuine) * impostor_total) if len(genuine) and impostor_total else float("nan")
    points = tuple(operating_point(genuine, top, impostor_total, f) for f in fprs)
    return Verification(genuine_total, impostor_total, auc, points, edges, genuine_hist, impostor_hist, genuine)


def roc_curve(result: Verification) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every histogram bin edge, from the top edge down (for plots;
    the operating points are the exact figures)."""
    impostor = np.concatenate([[0], np.cumsum(result.impostor_hist[::-1])])
    genuine = np.concatenate([[0], np.cumsum(result.genuine_hist[::-1])])
    return impostor / max(result.impostor_pairs, 1), genuine / max(result.genuine_pairs, 1)


def ten_fold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> tuple[float, float, list[float], list[float]]:
    """LFW protocol: mean and std of per-fold accuracy, each fold's threshold
    chosen on the other folds (the best accuracy over midpoints of their scores).
    Returns mean, std, per-fold accuracies and per-fold thresholds."""
    scores, same, folds = np.asarray(scores, np.float64), np.asarray(same, bool), np.asarray(folds)
    accs, thresholds = [], []
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        candidates = np.unique(scores[train])
        mids = np.concatenate([[candidates[0] - 1e-6], (candidates[:-1] + candidates[1:]) / 2, [candidates[-1] + 1e-6]])
        # accuracy at each candidate threshold, in one sorted pass
        order = np.argsort(scores[train])
        s, y = scores[train][order], same[train][order]
        below = np.searchsorted(s, mids, side="left")  # pairs with score < t are called different
        negatives_below = np.concatenate([[0], np.cumsum(~y)])[below]
        positives_above = y.sum() - np.concatenate([[0], np.cumsum(y)])[below]
        threshold = float(mids[int(np.argmax(negatives_below + positives_above))])
        thresholds.append(threshold)
        accs.append(float(((scores[test] >= threshold) == same[test]).mean()))
    return float(np.mean(accs)), float(np.std(accs)), accs, thresholds


def identification(embeddings: np.ndarray, labels: np.ndarray, k: int = 8, chunk: int = 1024) -> dict[str, float]:
    """Leave-one-out 1:N identification: rank-1 accuracy and mAP@k.

    Each face queries all the others. Faces whose identity has no other face
    are not queries (they cannot be found) but stay in the gallery.
    AP@k = sum over ranks r <= k of precision@r at each hit, / min(k, hits possible).
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.bincount(codes)
    n = len(x)
    rank1, ap, queries = 0, 0.0, 0
    kk = min(k, n - 1)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        scores = x[start:stop] @ x.T
        scores[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # leave the query out
        nearest = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < n else np.argsort(-scores, axis=1)
        order = np.take_along_axis(scores, nearest, 1).argsort(axis=1)[:, ::-1]
        nearest = np.take_along_axis(nearest, order, 1)[:, :kk]
        for row, ids in enumerate(nearest):
            q = start + row
            possible = counts[codes[q]] - 1
            if possible == 0:
                continue
            queries += 1
            hits = codes[ids] == codes[q]
            rank1 += bool(hits[0])
            precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
            ap += float((precision * hits).sum()) / min(kk, possible)
    return {"queries": queries, "rank1": rank1 / queries if queries else float("nan"),
            f"map@{k}": float(ap / queries) if queries else float("nan")}
