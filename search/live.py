"""A searcher that follows its gallery while other processes change it.

The HTTP service and the bot run for days while ``face-index add/remove/sync``
(or another service) change the gallery. ``LiveSearch`` checks gallery.json's
generation in a background thread and swaps in the new generation once it is
fully loaded. A request takes one :class:`Snapshot` (gallery + thumbnails of the
same generation) and answers from it, so it never sees half of a change and
never fails because of one.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from search.gallery import Gallery
from search.html import GalleryThumbnails
from search.searcher import Searcher

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One generation of the gallery and the thumbnails cut from it."""

    gallery: Gallery
    thumbnails: GalleryThumbnails

    @property
    def generation(self) -> int:
        return self.gallery.generation


class LiveSearch:
    """``searcher`` plus the current :class:`Snapshot`; ``watch()`` keeps it current."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self._snapshot = Snapshot(searcher.gallery, GalleryThumbnails(searcher.gallery))
        self._refreshing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def refresh(self) -> bool:
        """Load a newer generation if there is one (one thread at a time). True when swapped."""
        with self._refreshing:
            try:
                changed = self.searcher.refresh()
            except Exception as err:  # noqa: BLE001 - keep serving the generation we have
                log.warning("could not load the changed gallery (%s); still serving generation %d",
                            err, self._snapshot.generation)
                return False
            if changed:
                gallery = self.searcher.gallery
                self._snapshot = Snapshot(gallery, GalleryThumbnails(gallery))
            return changed

    def watch(self, interval: float = 1.0) -> None:
        """Check for changes every ``interval`` seconds in a daemon thread until ``stop()``."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="gallery-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
