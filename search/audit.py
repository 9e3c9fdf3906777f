"""``face-search audit``: what looks wrong in an identity-labelled gallery.

Three lists, from the same one-face-per-image set as ``face-search eval``:

- **identities whose faces disagree** (likely label noise): within each
  identity, faces are linked when their cosine is above the "uncertain"
  threshold (a pair of different people scores that high at most at that FPR,
  1e-2 by default). An identity whose faces fall into more than one linked
  group is listed, its largest group taken as the identity's own faces and the
  others as suspects, each with the identity it looks most like;
- **different identities that look like the same person**: pairs of
  identities whose mean cross-pair cosine (over all their faces' pairs, exact
  from the sums of their embeddings) is above the "same person" threshold;
- **near-duplicate images**: pairs of images whose faces' cosine is at least
  ``duplicate_threshold``, grouped so that every pair in a group is (complete
  linkage); a group that spans identities is marked.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search.calibration import Calibration
from search.evaluate import LabelledFaces, labelled_faces
from search.gallery import Gallery
from search.html import GalleryThumbnails, esc, figure, filters, page, summary_table, write_page
from search.metrics import verification

log = logging.getLogger(__name__)

DEFAULT_DUPLICATE_THRESHOLD = 0.985


@dataclass(frozen=True)
class SuspectGroup:
    face_ids: tuple[int, ...]
    mean_cosine_to_main: float  # mean over pairs (suspect, main-group face)
    looks_like: str | None  # the other identity whose faces these are closest to, on average
    looks_like_cosine: float | None


@dataclass(frozen=True)
class NoisyIdentity:
    identity: str
    faces: int
    main: tuple[int, ...]
    suspects: tuple[SuspectGroup, ...]

    @property
    def suspect_share(self) -> float:
        return sum(len(s.face_ids) for s in self.suspects) / self.faces


@dataclass(frozen=True)
class LookAlike:
    identity_a: str
    identity_b: str
    mean_cosine: float  # over all cross pairs
    best_pair: tuple[int, int]
    best_cosine: float
    faces_a: tuple[int, ...]
    faces_b: tuple[int, ...]


@dataclass(frozen=True)
class DuplicateGroup:
    face_ids: tuple[int, ...]
    paths: tuple[str, ...]
    identities: tuple[str, ...]
    max_cosine: float

    @property
    def mixed_identities(self) -> bool:
        return len(set(self.identities)) > 1


@dataclass(frozen=True, eq=False)
class Audit:
    gallery: str
    faces: int
    identities: int
    calibration: Calibration
    duplicate_threshold: float
    noisy: tuple[NoisyIdentity, ...]
    lookalikes: tuple[LookAlike, ...]
    duplicates: tuple[DuplicateGroup, ...]
    seconds: float
    lookalikes_total: int = 0  # identity pairs above the threshold; ``lookalikes`` keeps the most similar

    def to_dict(self) -> dict[str, Any]:
        return {
            "gallery": self.gallery, "faces": self.faces, "identities": self.identities,
            "calibration": self.calibration.to_dict(), "duplicate_threshold": self.duplicate_threshold,
            "noisy_identities": [
                {"identity": n.identity, "faces": n.faces, "main_group": list(n.main),
                 "suspects": [{"face_ids": list(s.face_ids), "mean_cosine_to_main": s.mean_cosine_to_main,
                               "looks_like": s.looks_like, "looks_like_cosine": s.looks_like_cosine} for s in n.suspects]}
                for n in self.noisy
            ],
            "lookalikes_total": self.lookalikes_total,
            "lookalikes": [
                {"identity_a": p.identity_a, "identity_b": p.identity_b, "mean_cosine": p.mean_cosine,
                 "best_pair": list(p.best_pair), "best_cosine": p.best_cosine} for p in self.lookalikes
            ],
            "near_duplicates": [
                {"face_ids": list(d.face_ids), "paths": list(d.paths), "identities": list(d.identities),
                 "max_cosine": d.max_cosine, "mixed_identities": d.mixed_identities} for d in self.duplicates
            ],
            "seconds": round(self.seconds, 2),
        }


def _components(linked: np.ndarray) -> list[np.ndarray]:
    """Connected components of a boolean adjacency matrix, largest first."""
    n = len(linked)
    label = -np.ones(n, int)
    current = 0
    for seed in range(n):
        if label[seed] >= 0:
            continue
        stack = [seed]
        label[seed] = current
        while stack:
            node = stack.pop()
            for nxt in np.flatnonzero(linked[node] & (label < 0)):
                label[nxt] = current
                stack.append(int(nxt))
        current += 1
    groups = [np.flatnonzero(label == c) for c in range(current)]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def _identity_sums(x: np.ndarray, codes: np.ndarray, count: int) -> np.ndarray:
    sums = np.zeros((count, x.shape[1]), np.float64)
    np.add.at(sums, codes, x)
    return sums


def _noisy(faces: LabelledFaces, codes, names, sums, counts, link: float) -> list[NoisyIdentity]:  # noqa: ANN001
    x = faces.embeddings
    out = []
    for code in np.flatnonzero(counts >= 2):
        members = np.flatnonzero(codes == code)
        sims = x[members] @ x[members].T
        groups = _components(sims > link)
        if len(groups) < 2:
            continue
        main = groups[0]
        suspects = []
        for g in groups[1:]:
            to_main = float(sims[np.ix_(g, main)].mean())
            # mean cosine of this group's faces to each other identity's faces
            mean_to = (x[members[g]].sum(0) @ sums.T) / (len(g) * np.maximum(counts, 1))
            mean_to[code] = -np.inf
            best = int(np.argmax(mean_to))
            has_other = np.isfinite(mean_to[best])
            suspects.append(SuspectGroup(
                tuple(int(faces.face_ids[members[i]]) for i in g), to_main,
                str(names[best]) if has_other else None, float(mean_to[best]) if has_other else None))
        out.append(NoisyIdentity(str(names[code]), len(members), tuple(int(faces.face_ids[members[i]]) for i in main),
                                 tuple(sorted(suspects, key=lambda s: s.mean_cosine_to_main))))
    # most suspicious first: the largest share of faces outside the main group, then the least similar
    return sorted(out, key=lambda n: (-n.suspect_share, min(s.mean_cosine_to_main for s in n.suspects)))


def _lookalikes(faces: LabelledFaces, codes, names, sums, counts, threshold: float, keep: int,  # noqa: ANN001
                chunk: int = 1024) -> tuple[list[LookAlike], int]:
    x = faces.embeddings
    found: list[tuple[float, int, int]] = []
    for start in range(0, len(sums), chunk):
        block = sums[start:start + chunk] @ sums.T / np.outer(counts[start:start + chunk], counts)
        rows, cols = np.nonzero(block > threshold)
        for r, c in zip(rows, cols):
            a = start + int(r)
            if a < c:
                found.append((float(block[r, c]), a, int(c)))
    out = []
    for mean, a, b in sorted(found, reverse=True)[:keep]:
        ma, mb = np.flatnonzero(codes == a), np.flatnonzero(codes == b)
        cross = x[ma] @ x[mb].T
        i, j = np.unravel_index(int(np.argmax(cross)), cross.shape)
        out.append(LookAlike(str(names[a]), str(names[b]), mean, (int(faces.face_ids[ma[i]]), int(faces.face_ids[mb[j]])),
                             float(cross[i, j]), tuple(int(f) for f in faces.face_ids[ma]),
                             tuple(int(f) for f in faces.face_ids[mb])))
    return out, len(found)


def _duplicates(faces: LabelledFaces, threshold: float, chunk: int = 1024) -> list[DuplicateGroup]:
    """Groups in which every pair is at or above ``threshold`` (complete linkage:
    no chains of merely similar photos), merged from the most similar pair down."""
    x = faces.embeddings
    pairs: list[tuple[float, int, int]] = []
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk] @ x.T
        rows, cols = np.nonzero(block >= threshold)
        pairs.extend((float(block[r, c]), start + int(r), int(c)) for r, c in zip(rows, cols) if start + int(r) < c)
    group_of: dict[int, list[int]] = {}
    for _, i, j in sorted(pairs, reverse=True):
        gi, gj = group_of.get(i, [i]), group_of.get(j, [j])
        if gi is gj or (x[gi] @ x[gj].T).min() < threshold:
            continue
        merged = gi + gj
        for m in merged:
            group_of[m] = merged
    out, seen = [], set()
    for members in group_of.values():
        if id(members) in seen:
            continue
        seen.add(id(members))
        members = sorted(members)
        sims = x[members] @ x[members].T
        np.fill_diagonal(sims, -np.inf)
        out.append(DuplicateGroup(
            tuple(int(faces.face_ids[m]) for m in members), tuple(str(faces.paths[m]) for m in members),
            tuple(str(faces.labels[m]) for m in members), float(sims.max())))
    return sorted(out, key=lambda d: (not d.mixed_identities, -d.max_cosine))


def audit_gallery(
    gallery: Gallery | str | os.PathLike[str],
    calibration: Calibration | None = None,
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
    max_lookalikes: int = 1000,
) -> Audit:
    """Audit an identity-labelled gallery. Thresholds: ``calibration``, else the
    gallery's own (face-search eval), else measured here on the gallery itself.

    duplicate_threshold: cosine at or above which two images count as near-duplicates;
    lower finds re-shot and re-cropped photos too, and more pairs of merely similar photos.
    max_lookalikes: how many of the look-alike identity pairs to keep, most similar first
    (in a gallery of many one-photo identities, chance alone puts thousands above the threshold).
    """
    g = gallery if isinstance(gallery, Gallery) else Gallery.load(gallery)
    start = time.perf_counter()
    faces = labelled_faces(g)
    names, codes = np.unique(faces.labels.astype(str), return_inverse=True)
    counts = np.bincount(codes, minlength=len(names)).astype(np.float64)
    calibration = calibration or g.calibration
    if calibration is None:
        v = verification(faces.embeddings, faces.labels, fprs=(1e-2, 1e-3))
        calibration = Calibration(1e-3, v.points[1].threshold, 1e-2, v.points[0].threshold, v.points[1].tpr,
                                  source="measured by face-search audit on the gallery itself")
        log.info("gallery uncalibrated: thresholds measured on it (%.4f, %.4f)", calibration.threshold,
                 calibration.uncertain_threshold)
    sums = _identity_sums(faces.embeddings, codes, len(names))
    noisy = _noisy(faces, codes, names, sums, counts, calibration.uncertain_threshold)
    lookalikes, lookalikes_total = _lookalikes(faces, codes, names, sums, counts, calibration.threshold, max_lookalikes)
    duplicates = _duplicates(faces, duplicate_threshold)
    seconds = time.perf_counter() - start
    log.info("audit of %d faces: %d noisy identities, %d look-alike pairs, %d near-duplicate groups in %.1f s",
             len(faces.labels), len(noisy), len(lookalikes), len(duplicates), seconds)
    return Audit(str(g.directory), len(faces.labels), len(names), calibration, duplicate_threshold,
                 tuple(noisy), tuple(lookalikes), tuple(duplicates), seconds, lookalikes_total)


def format_audit(audit: Audit, limit: int = 20) -> str:
    c = audit.calibration
    lines = [
        f"audit of {audit.gallery}: {audit.faces} faces, {audit.identities} identities; "
        f"linked above {c.uncertain_threshold:.4f} (FPR {c.uncertain_fpr:.0e}), duplicates at >= {audit.duplicate_threshold}",
        f"identities whose faces disagree: {len(audit.noisy)}",
    ]
    for n in audit.noisy[:limit]:
        groups = "; ".join(
            f"{len(s.face_ids)} face(s) {list(s.face_ids)[:6]} at {s.mean_cosine_to_main:.3f} to the rest"
            + (f", like {s.looks_like} ({s.looks_like_cosine:.3f})" if s.looks_like else "") for s in n.suspects)
        lines.append(f"  {n.identity}: {len(n.main)} of {n.faces} agree; {groups}")
    lines.append(f"different identities that look alike: {audit.lookalikes_total} (most similar first)")
    for p in audit.lookalikes[:limit]:
        lines.append(f"  {p.identity_a} ~ {p.identity_b}: mean cosine {p.mean_cosine:.3f}, best pair "
                     f"{p.best_pair[0]}-{p.best_pair[1]} at {p.best_cosine:.3f}")
    lines.append(f"near-duplicate groups: {len(audit.duplicates)}")
    for d in audit.duplicates[:limit]:
        mark = " (identities differ)" if d.mixed_identities else ""
        lines.append(f"  {', '.join(d.paths[:4])}{' ...' if len(d.paths) > 4 else ''} at {d.max_cosine:.3f}{mark}")
    return "\n".join(lines)


def write_audit_html(audit: Audit, gallery: Gallery, out: str | os.PathLike[str], limit: int = 200,
                     faces_shown: int = 12) -> Path:
    """The audit as one self-contained HTML page (the first ``limit`` items of each list)."""
    thumbs = GalleryThumbnails(gallery)
    c = audit.calibration

    def card(face_id: int, verdict: str, extra: str = "") -> str:
        row = gallery.row(face_id)
        caption = f"id {esc(str(row['identity']))}{extra}<br><span class=\"muted\">{esc(Path(row['path']).name)}</span>"
        return figure(thumbs(face_id), caption, verdict, f"{row['path']} (face {face_id})")

    sections = []
    for n in audit.noisy[:limit]:
        more = f'<span class="muted">+{len(n.main) - faces_shown}</span>' if len(n.main) > faces_shown else ""
        groups = [f'<div class="group"><h3>agreeing: {len(n.main)}</h3><div class="faces">'
                  + "".join(card(f, "same") for f in n.main[:faces_shown]) + more + "</div></div>"]
        for s in n.suspects:
            like = f"; like id {esc(s.looks_like)} ({s.looks_like_cosine:.3f})" if s.looks_like else ""
            groups.append(f'<div class="group"><h3>{len(s.face_ids)} apart: {s.mean_cosine_to_main:.3f} to the '
                          f"agreeing{like}</h3><div class=\"faces\">"
                          + "".join(card(f, "different") for f in s.face_ids[:faces_shown]) + "</div></div>")
        tie = len(n.main) <= max(len(s.face_ids) for s in n.suspects)
        heading = (f"faces split into {len(n.suspects) + 1} groups of similar size (which is right?)" if tie
                   else f"{n.faces - len(n.main)} of {n.faces} faces disagree with the rest")
        sections.append(f'<section class="item" data-kind="noisy" data-text="{esc(n.identity.lower())}">'
                        f'<h2>identity {esc(n.identity)}: {heading}</h2><div class="groups">{"".join(groups)}</div></section>')
    for p in audit.lookalikes[:limit]:
        half = max(1, faces_shown // 2)
        body = ('<div class="faces">' + "".join(card(f, "uncertain") for f in p.faces_a[:half])
                + '<span class="arrow">&harr;</span>' + "".join(card(f, "uncertain") for f in p.faces_b[:half]) + "</div>")
        sections.append(
            f'<section class="item" data-kind="lookalike" data-text="{esc((p.identity_a + " " + p.identity_b).lower())}">'
            f"<h2>identities {esc(p.identity_a)} and {esc(p.identity_b)}: mean cosine {p.mean_cosine:.3f}, "
            f"best pair {p.best_cosine:.3f}</h2>{body}</section>")
    for d in audit.duplicates[:limit]:
        verdict = "different" if d.mixed_identities else "same"
        body = '<div class="faces">' + "".join(card(f, verdict) for f in d.face_ids[:faces_shown]) + "</div>"
        mark = " (different identities)" if d.mixed_identities else ""
        sections.append(
            f'<section class="item" data-kind="duplicate" data-text="{esc(" ".join(d.paths + d.identities).lower())}">'
            f"<h2>{len(d.face_ids)} near-duplicate images, cosine up to {d.max_cosine:.3f}{mark}</h2>{body}</section>")
    summary = summary_table([
        ("gallery", f"{esc(audit.gallery)}: {audit.faces:,} labelled faces (one per image), {audit.identities:,} identities"),
        ("identities whose faces disagree", f"{len(audit.noisy)} (likely label noise)"),
        ("different identities that look alike", f"{audit.lookalikes_total:,} pairs with a mean cosine above "
                                                 f"{c.threshold:.3f} (FPR {c.fpr:.0e}), most similar first"),
        ("near-duplicate groups", f"{len(audit.duplicates)} ({sum(d.mixed_identities for d in audit.duplicates)} "
                                  "across identities)"),
        ("thresholds", f"faces linked above cosine {c.uncertain_threshold:.3f} (FPR {c.uncertain_fpr:.0e}); "
                       f"near-duplicates at &ge; {audit.duplicate_threshold}; {esc(c.source)}"),
        ("shown", f"the first {limit} of each list"),
    ])
    kinds = [("noisy", "faces disagree"), ("lookalike", "look-alike identities"), ("duplicate", "near-duplicates")]
    body = summary + filters(kinds, "filter by identity or file name") + "".join(sections)
    return write_page(out, page("facesearch gallery audit", body))
