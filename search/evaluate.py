"""``face-search eval``: how well a gallery's pipeline tells people apart.

For an identity-labelled gallery: verification over all pairs (TPR at fixed
FPRs with thresholds, ROC AUC, score histograms), leave-one-out 1:N
identification (rank-1, mAP@k), LFW View 2 accuracy when given ``pairs.txt``,
and a calibration (two thresholds) to store in gallery.json.

One face per image is evaluated: the image's label names one person, and
other faces in the picture (LFW has many) are someone else. The labelled face
is the one nearest the image centre among faces at least half as tall as the
largest (LFW centres its subject; a crop's only face is trivially chosen).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.errors import GalleryError
from search.calibration import Calibration
from search.gallery import Gallery
from search.metrics import Verification, identification, ten_fold_accuracy, verification

log = logging.getLogger(__name__)

DEFAULT_FPRS = (1e-2, 1e-3, 1e-4)
DEFAULT_CALIBRATION_FPR = 1e-3
UNCERTAIN_FACTOR = 10  # the uncertain band's FPR is this many times the calibrated one


class EvalError(GalleryError, ValueError):
    """A gallery that cannot be evaluated, and why."""


@dataclass(frozen=True, eq=False)
class LabelledFaces:
    """The faces that carry their image's label: face ids, labels and embeddings."""

    face_ids: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    embeddings: np.ndarray


def labelled_faces(gallery: Gallery) -> LabelledFaces:
    """One face per identity-labelled image (see the module doc)."""
    table = gallery.read_columns(["face_id", "path", "identity", "box", "width", "height"])
    identity = table.column("identity")
    keep = np.asarray(identity.is_valid().to_numpy(zero_copy_only=False), bool)
    if not keep.any():
        raise EvalError(f"{gallery.directory}: no face has an identity label; eval needs an identity-labelled gallery")
    rows = np.flatnonzero(keep)
    all_paths = np.asarray(table.column("path").to_pylist(), dtype=object)
    paths = all_paths[rows]
    boxes = np.asarray(table.column("box").combine_chunks().flatten().to_numpy(), np.float64).reshape(-1, 4)[rows]
    width = table.column("width").to_numpy()[rows].astype(np.float64)
    height = table.column("height").to_numpy()[rows].astype(np.float64)
    _, group = np.unique(paths, return_inverse=True)
    face_height = boxes[:, 3] - boxes[:, 1]
    tallest = np.zeros(group.max() + 1)
    np.maximum.at(tallest, group, face_height)
    centre_distance = np.hypot((boxes[:, 0] + boxes[:, 2] - width) / 2, (boxes[:, 1] + boxes[:, 3] - height) / 2)
    key = centre_distance + np.where(face_height >= 0.5 * tallest[group], 0.0, 1e9)
    order = np.lexsort((key, group))
    first = order[np.concatenate([[True], group[order][1:] != group[order][:-1]])]
    chosen = np.sort(rows[first])
    embeddings = gallery.embeddings()[chosen]
    labels = np.asarray(identity.take(chosen).to_pylist(), dtype=object)
    return LabelledFaces(chosen, labels, all_paths[chosen], embeddings)


def lfw_accuracy(faces: LabelledFaces, pairs_path: str | os.PathLike[str]) -> dict[str, Any]:
    """LFW View 2: 10-fold accuracy over ``pairs.txt``, each fold's threshold chosen on the other nine.

    Pair images are matched to gallery images by their last two path parts
    (``Name/Name_0001.jpg``). A pair with an image where no face was found
    scores -1 (called different) and is counted in ``pairs_without_face``.
    """
    from data.lfw_pairs import read_pairs

    folds = read_pairs(pairs_path)
    by_name = {"/".join(str(p).split("/")[-2:]): i for i, p in enumerate(faces.paths)}
    scores, same, fold_ids, missing = [], [], [], 0
    for fold, pairs in enumerate(folds):
        for pair in pairs:
            a, b = by_name.get(pair.path_a), by_name.get(pair.path_b)
            if a is None or b is None:
                missing += 1
                scores.append(-1.0)
            else:
                scores.append(float(faces.embeddings[a] @ faces.embeddings[b]))
            same.append(pair.same)
            fold_ids.append(fold)
    if missing == len(scores):
        raise EvalError(f"none of the images of {pairs_path} has a face in this gallery: is it an LFW gallery?")
    if len(folds) < 2:
        raise EvalError(f"{pairs_path} has one fold; the 10-fold protocol needs View 2's pairs.txt")
    mean, std, accs, thresholds = ten_fold_accuracy(np.array(scores), np.array(same), np.array(fold_ids))
    return {
        "pairs_file": str(pairs_path), "pairs": len(scores), "pairs_without_face": missing, "folds": len(folds),
        "accuracy": mean, "std": std, "fold_accuracies": accs, "mean_threshold": float(np.mean(thresholds)),
    }


@dataclass(frozen=True, eq=False)
class EvalResult:
    gallery: str
    faces: int
    identities: int
    verification: Verification
    identification: dict[str, float]
    calibration: Calibration
    lfw: dict[str, Any] | None
    seconds: float
    figures: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        v = self.verification
        return {
            "gallery": self.gallery, "faces": self.faces, "identities": self.identities,
            "verification": {
                "genuine_pairs": v.genuine_pairs, "impostor_pairs": v.impostor_pairs, "roc_auc": v.auc,
                "operating_points": [
                    {"target_fpr": p.target_fpr, "threshold": p.threshold, "tpr": p.tpr, "fpr": p.fpr} for p in v.points
                ],
            },
            "identification": self.identification,
            "lfw": self.lfw,
            "calibration": self.calibration.to_dict(),
            "figures": self.figures,
            "seconds": round(self.seconds, 2),
        }


def evaluate(
    gallery: Gallery | str | os.PathLike[str],
    fprs: tuple[float, ...] = DEFAULT_FPRS,
    k: int = 8,
    calibration_fpr: float = DEFAULT_CALIBRATION_FPR,
    lfw_pairs: str | os.PathLike[str] | None = None,
    figures_dir: str | os.PathLike[str] | None = None,
) -> EvalResult:
    """Evaluate an identity-labelled gallery. Figures (PNG) go to ``figures_dir`` when given.

    calibration_fpr: the "same person" threshold's FPR; lower is stricter (fewer
    false matches, more missed ones). The "uncertain" band reaches down to the
    threshold at 10x that FPR.
    """
    g = gallery if isinstance(gallery, Gallery) else Gallery.load(gallery)
    for fpr in (*fprs, calibration_fpr):
        if not 0 < fpr < 1:
            raise EvalError(f"false-positive rates must be between 0 and 1, got {fpr}")
    uncertain_fpr = min(calibration_fpr * UNCERTAIN_FACTOR, 0.5)
    start = time.perf_counter()
    faces = labelled_faces(g)
    identities = len(set(faces.labels))
    if identities < 2:
        raise EvalError(f"{g.directory}: eval needs at least 2 identities, found {identities}")
    all_fprs = tuple(sorted(set(fprs) | {calibration_fpr, uncertain_fpr}, reverse=True))
    v = verification(faces.embeddings, faces.labels, fprs=all_fprs, bins=2000)
    if v.genuine_pairs == 0:
        raise EvalError(f"{g.directory}: no identity has two faces, so there are no same-person pairs")
    points = {p.target_fpr: p for p in v.points}
    calibration = Calibration(
        fpr=calibration_fpr, threshold=points[calibration_fpr].threshold, uncertain_fpr=uncertain_fpr,
        uncertain_threshold=points[uncertain_fpr].threshold, tpr=points[calibration_fpr].tpr,
        source=f"face-search eval of {g.directory.resolve()}: {len(faces.labels)} faces, {identities} identities",
    )
    shown = Verification(v.genuine_pairs, v.impostor_pairs, v.auc, tuple(points[f] for f in fprs), v.bin_edges,
                         v.genuine_hist, v.impostor_hist, v.genuine_scores)
    ident = identification(faces.embeddings, faces.labels, k=k)
    lfw = lfw_accuracy(faces, lfw_pairs) if lfw_pairs is not None else None
    figures: dict[str, str] = {}
    if figures_dir is not None:
        from search.plots import plot_histogram, plot_roc

        out = Path(figures_dir)
        out.mkdir(parents=True, exist_ok=True)
        title = f"{g.directory.name}: {len(faces.labels)} faces, {identities} identities"
        figures["histogram"] = str(plot_histogram(shown, out / "similarity_histogram.png", title, calibration))
        figures["roc"] = str(plot_roc(shown, out / "roc.png", title))
    seconds = time.perf_counter() - start
    log.info("evaluated %d faces of %d identities in %.1f s", len(faces.labels), identities, seconds)
    return EvalResult(str(g.directory), len(faces.labels), identities, shown, ident, calibration, lfw, seconds, figures)


def format_eval(result: EvalResult) -> str:
    """A readable table of an evaluation."""
    v = result.verification
    lines = [
        f"gallery {result.gallery}: {result.faces} faces, {result.identities} identities",
        f"verification: {v.genuine_pairs:,} same-person and {v.impostor_pairs:,} different-person pairs, "
        f"ROC AUC {v.auc:.5f}",
        f"  {'FPR':>8}  {'threshold':>9}  {'TPR':>7}",
    ]
    lines += [f"  {p.target_fpr:>8.0e}  {p.threshold:>9.4f}  {p.tpr:>7.4f}" for p in v.points]
    ident = result.identification
    map_key = next(key for key in ident if key.startswith("map@"))
    lines.append(
        f"identification (leave-one-out, {ident['queries']} queries): rank-1 {ident['rank1']:.4f}, "
        f"{map_key.replace('map', 'mAP')} {ident[map_key]:.4f}"
    )
    if result.lfw is not None:
        lfw = result.lfw
        lines.append(
            f"LFW {lfw['folds']}-fold: {100 * lfw['accuracy']:.2f}% ± {100 * lfw['std']:.2f} over {lfw['pairs']} pairs"
            f" ({lfw['pairs_without_face']} with an image without a face), mean threshold {lfw['mean_threshold']:.4f}"
        )
    c = result.calibration
    lines.append(
        f"calibration: same person above {c.threshold:.4f} (FPR {c.fpr:.0e}, TPR {c.tpr:.4f}), "
        f"uncertain above {c.uncertain_threshold:.4f} (FPR {c.uncertain_fpr:.0e}), different below"
    )
    for name, path in result.figures.items():
        lines.append(f"figure {name}: {path}")
    lines.append(f"{result.seconds:.1f} s")
    return "\n".join(lines)
