"""``face-search report``: one self-contained HTML page of query faces and their nearest gallery faces."""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from facesearch.errors import ConfigurationError
from data.images import ImageLoadError, load_image
from search.html import (
    GalleryThumbnails, esc, face_thumbnail, figure, filters, page, summary_table, write_page,
)
from search.calibration import verdict_label
from search.searcher import FaceResult, Searcher

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class ReportError(ConfigurationError):
    """A report that cannot be made, and why."""


@dataclass(frozen=True)
class ReportSummary:
    path: Path
    queries: int
    faces: int
    no_face: int
    errors: int
    top_verdicts: dict[str, int] = field(default_factory=dict)
    missing_thumbnails: int = 0


def query_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, and the images inside directories (recursively, sorted)."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            out.append(path)
        else:
            raise ReportError(f"{path} does not exist")
    if not out:
        raise ReportError("no query images found")
    return out


def _face_block(result: FaceResult, image, thumbs: GalleryThumbnails) -> str:  # noqa: ANN001
    det = result.face.detection
    parts = [figure(face_thumbnail(image, det.box), f"face {result.face.face_index}<br>score {det.score:.2f}", "query",
                    f"query face {result.face.face_index}")]
    parts.append('<span class="arrow">&rarr;</span>')
    for rank, m in enumerate(result.matches, 1):
        verdict = m.verdict or "none"
        identity = "no identity" if m.identity is None else f"id {m.identity}"
        caption = (f'<span class="cos">{m.cosine:.3f}</span> #{rank}<br>{esc(identity)}<br>'
                   f'<span class="muted">{esc(Path(m.path).name)}</span>')
        parts.append(figure(thumbs(m.face_id), caption, verdict, f"{verdict_label(m.verdict)}: {m.path} (face {m.face_id})"))
    return f'<div class="faces">{"".join(parts)}</div>'


def build_report(
    searcher: Searcher | str | os.PathLike[str],
    images: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    k: int = 8,
    title: str = "facesearch similarity report",
    progress: Callable[[int, int], None] | None = None,
) -> ReportSummary:
    """Search every face of every query image and write one HTML page.

    k: matches shown per face; more is more context, a bigger page.
    """
    searcher = searcher if isinstance(searcher, Searcher) else Searcher(searcher)
    paths = query_images(images)
    gallery = searcher.gallery
    calibration = gallery.calibration
    thumbs = GalleryThumbnails(gallery)
    sections, toc_rows = [], []
    faces_total = no_face = errors = 0
    top_verdicts: Counter[str] = Counter()
    for number, path in enumerate(paths):
        anchor = f"q{number}"
        try:
            image = load_image(path)
        except ImageLoadError as err:
            errors += 1
            kind, identities = "error", []
            body = f'<p class="tag different">cannot read: {esc(err.reason)}</p>'
            best = f'<span class="muted">error: {esc(err.reason)}</span>'
        else:
            results = searcher.search(image, k=k)
            faces_total += len(results)
            identities = [str(m.identity) for r in results for m in r.matches]
            if not results:
                no_face += 1
                kind, best = "noface", '<span class="muted">no face found</span>'
                body = '<p class="muted">no face found</p>'
            else:
                top = [r.matches[0] for r in results if r.matches]
                verdicts = [m.verdict or "none" for m in top]
                for v in verdicts:
                    top_verdicts[v] += 1
                # the item's kind is its best face's verdict
                kind = next((v for v in ("same", "uncertain", "different", "none") if v in verdicts), "none")
                body = "".join(
                    f"<h3>face {r.face.face_index} of {len(results)}</h3>{_face_block(r, image, thumbs)}" for r in results
                )
                best = ", ".join(
                    f'<span class="tag {m.verdict or "none"}">{m.cosine:.3f}</span> '
                    f'{esc("-" if m.identity is None else str(m.identity))}' for m in top
                )
        text = " ".join([str(path), *identities]).lower()
        sections.append(
            f'<section class="item" id="{anchor}" data-kind="{kind}" data-text="{esc(text)}">'
            f"<h2>{number + 1}. {esc(str(path))}</h2>{body}</section>"
        )
        toc_rows.append(f'<tr><td class="num">{number + 1}</td><td><a href="#{anchor}">{esc(path.name)}</a></td>'
                        f"<td>{best}</td></tr>")
        if progress is not None:
            progress(number + 1, len(paths))

    if calibration is not None:
        legend = (
            f'<span class="same">same person: cosine &gt; {calibration.threshold:.3f}</span>'
            f'<span class="uncertain">uncertain: &gt; {calibration.uncertain_threshold:.3f}</span>'
            f'<span class="different">different person: &le; {calibration.uncertain_threshold:.3f}</span>'
            f'<span class="muted"> thresholds at FPR {calibration.fpr:.0e} and {calibration.uncertain_fpr:.0e}</span>'
        )
    else:
        legend = ('<span class="none">uncalibrated</span> <span class="muted">run face-search eval on an '
                  "identity-labelled gallery to colour matches by verdict</span>")
    summary = summary_table([
        ("gallery", f"{esc(str(gallery.directory))}: {len(gallery):,} faces, {gallery.dim}-D"),
        ("queries", f"{len(paths):,} images, {faces_total:,} faces; {no_face} without a face, {errors} unreadable"),
        ("best match per face", ", ".join(f'<span class="tag {v}">{verdict_label(None if v == "none" else v)}</span> {n}'
                                          for v, n in top_verdicts.most_common()) or "-"),
        ("matches per face", str(k)),
        ("legend", f'<div class="legend">{legend}</div>'),
        ("made", _dt.datetime.now().isoformat(timespec="seconds")),
    ])
    kinds = [("same", "best match: same person"), ("uncertain", "best match: uncertain"),
             ("different", "best match: different person"), ("none", "uncalibrated"),
             ("noface", "no face"), ("error", "unreadable")]
    toc = ('<details open><summary>All queries</summary><table><tr><th>#</th><th>image</th>'
           f'<th>best match of each face (cosine, identity)</th></tr>{"".join(toc_rows)}</table></details>')
    body = summary + toc + filters(kinds, "filter by file name or identity") + "".join(sections)
    path = write_page(out, page(title, body))
    if thumbs.missing:
        log.warning("%d gallery images could not be read for thumbnails (is the dataset root %s still there?)",
                    thumbs.missing, gallery.dataset_root)
    log.info("report of %d images, %d faces written to %s", len(paths), faces_total, path)
    return ReportSummary(path, len(paths), faces_total, no_face, errors, dict(top_verdicts), thumbs.missing)
