"""Self-contained HTML pages (reports, audits): face thumbnails embedded as
data URIs, one stylesheet, a small filter script, nothing fetched from anywhere."""

from __future__ import annotations

import base64
import html
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from data.images import ImageLoadError, load_image
from embedder.crops import square_crop

log = logging.getLogger(__name__)

THUMB_SIZE = 96
#: an image that could not be read: a grey square with a question mark (it still "loads")
MISSING_THUMB = "data:image/svg+xml;base64," + base64.b64encode(
    b'<svg xmlns="http://www.w3.org/2000/svg" width="96" height="96"><rect width="96" height="96" fill="#ddd"/>'
    b'<text x="48" y="60" font-size="40" text-anchor="middle" fill="#888">?</text></svg>'
).decode("ascii")

esc = html.escape


def face_thumbnail(image: np.ndarray, box: Sequence[float], size: int = THUMB_SIZE, margin: float = 0.2) -> str:
    """A square JPEG data URI of the face in ``box`` (x1, y1, x2, y2) with ``margin`` around it."""
    return "data:image/jpeg;base64," + base64.b64encode(face_thumbnail_jpeg(image, box, size, margin)).decode("ascii")


def face_crop(image: np.ndarray, box: Sequence[float], size: int = THUMB_SIZE, margin: float = 0.2) -> np.ndarray:
    """A square RGB crop (size x size) of the face in ``box`` with ``margin`` around it, grey outside the image."""
    return square_crop(image, box, size, margin)[0]


def encode_jpeg(rgb: np.ndarray, quality: int = 82) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - encoding a valid array does not fail
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def face_thumbnail_jpeg(image: np.ndarray, box: Sequence[float], size: int = THUMB_SIZE, margin: float = 0.2) -> bytes:
    """The JPEG bytes of :func:`face_crop`."""
    return encode_jpeg(face_crop(image, box, size, margin))


class GalleryThumbnails:
    """Thumbnails of gallery faces, read from the gallery's dataset root, cached by face id."""

    def __init__(self, gallery, size: int = THUMB_SIZE, cache_images: int = 64) -> None:  # noqa: ANN001
        self.gallery = gallery
        self.size = size
        self._thumbs: dict[int, str] = {}
        self._images: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._cache_images = cache_images
        self._lock = threading.Lock()  # the service and the bot read thumbnails from worker threads
        self.missing = 0

    def _image(self, relative: str) -> np.ndarray | None:
        with self._lock:
            return self._image_locked(relative)

    def _image_locked(self, relative: str) -> np.ndarray | None:
        if relative in self._images:
            self._images.move_to_end(relative)
            return self._images[relative]
        path = self.gallery.image_path(relative)
        image = None
        if path is not None:
            try:
                image = load_image(path)
            except ImageLoadError as err:
                log.warning("no thumbnail for %s: %s", relative, err.reason)
        self._images[relative] = image
        if len(self._images) > self._cache_images:
            self._images.popitem(last=False)
        return image

    def crop(self, face_id: int, size: int | None = None) -> np.ndarray | None:
        """The face's square RGB crop, or None when its image cannot be read."""
        row = self.gallery.row(face_id)
        image = self._image(row["path"])
        return None if image is None else face_crop(image, row["box"], size or self.size)

    def __call__(self, face_id: int) -> str:
        if face_id not in self._thumbs:
            crop = self.crop(face_id)
            if crop is None:
                self.missing += 1
                self._thumbs[face_id] = MISSING_THUMB
            else:
                self._thumbs[face_id] = "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(crop)).decode("ascii")
        return self._thumbs[face_id]


def figure(src: str, caption: str, css_class: str = "", title: str = "") -> str:
    """One thumbnail with a caption (caption and title are escaped here)."""
    return (
        f'<figure class="face {css_class}"><img src="{src}" width="{THUMB_SIZE}" height="{THUMB_SIZE}" '
        f'alt="{esc(title or caption)}" title="{esc(title or caption)}"><figcaption>{caption}</figcaption></figure>'
    )


STYLE = """
:root { --same: #1b7f3a; --uncertain: #c98a00; --different: #b3261e; --none: #777; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5rem 3rem; color: #222; background: #fafafa; }
h1 { font-size: 1.5rem; margin: 1rem 0 .5rem; } h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
h3 { font-size: .95rem; margin: .6rem 0 .3rem; word-break: break-all; }
table { border-collapse: collapse; margin: .5rem 0; background: #fff; }
td, th { border: 1px solid #ddd; padding: .2rem .5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.summary td:first-child { font-weight: 600; }
.legend span, .tag { display: inline-block; padding: 0 .5rem; border-radius: 3px; color: #fff; margin-right: .3rem; }
.same { --c: var(--same); } .uncertain { --c: var(--uncertain); } .different { --c: var(--different); }
.none { --c: var(--none); }
.legend span, .tag { background: var(--c); }
section.item { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .3rem .8rem .6rem; margin: .8rem 0;
  content-visibility: auto; contain-intrinsic-size: auto 260px; }
.faces { display: flex; flex-wrap: wrap; gap: .4rem; align-items: flex-start; }
figure.face { margin: 0; width: 104px; border: 4px solid var(--c, #ccc); border-radius: 4px; background: #fff; }
figure.face img { display: block; width: 96px; height: 96px; }
figure.face figcaption { font-size: 11px; line-height: 1.25; padding: 2px; word-break: break-all; }
figure.query { border-color: #333; }
.cos { font-weight: 700; color: var(--c, #333); }
.arrow { align-self: center; font-size: 1.4rem; color: #999; }
.filters { position: sticky; top: 0; background: #fafafa; padding: .5rem 0; z-index: 1; border-bottom: 1px solid #ddd; }
.filters input { width: 22rem; padding: .2rem .4rem; }
.groups { display: flex; flex-wrap: wrap; gap: .4rem 1.5rem; }
.group h3 { font-weight: 500; }
.hidden { display: none !important; }
.muted { color: #777; }
"""

SCRIPT = """
(function () {
  var text = document.getElementById('filter-text'), kind = document.getElementById('filter-kind');
  if (!text || !kind) { return; }
  var items = Array.prototype.slice.call(document.querySelectorAll('section.item'));
  var count = document.getElementById('filter-count');
  function apply() {
    var q = text.value.trim().toLowerCase(), k = kind.value, shown = 0;
    items.forEach(function (el) {
      var ok = (!q || el.getAttribute('data-text').indexOf(q) >= 0) && (!k || el.getAttribute('data-kind') === k);
      el.classList.toggle('hidden', !ok); if (ok) { shown += 1; }
    });
    count.textContent = shown + ' of ' + items.length + ' shown';
  }
  text.addEventListener('input', apply); kind.addEventListener('change', apply); apply();
})();
"""


def filters(kinds: Sequence[tuple[str, str]], placeholder: str) -> str:
    """A sticky text + kind filter over the page's ``section.item`` elements."""
    options = "".join(f'<option value="{esc(v)}">{esc(label)}</option>' for v, label in kinds)
    return (
        f'<div class="filters"><input id="filter-text" type="search" placeholder="{esc(placeholder)}"> '
        f'<select id="filter-kind"><option value="">all</option>{options}</select> '
        '<span id="filter-count" class="muted"></span></div>'
    )


def summary_table(rows: Sequence[tuple[str, str]]) -> str:
    """Label/value rows; values are HTML (escape them before)."""
    return '<table class="summary">' + "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{esc(title)}</h1>{body}<script>{SCRIPT}</script></body></html>\n"
    )


def write_page(path: str | Path, content: str) -> Path:
    """Write atomically: a half-written report never replaces a good one."""
    import os

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, out)
    return out

