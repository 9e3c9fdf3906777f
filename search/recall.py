"""Recall of a gallery's index, measured now: ``face-index check-recall``.

The same measurement the build's tuning makes (indexer/build.py ``held_out_index``):
the index is rebuilt without the build's seeded sample of faces, which become the
queries (half as new photos of people in the gallery, half as strangers), and its
answers with the stored settings are compared with exact search. HNSW builds use
threads, so the figure is close to the stored one rather than equal.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from indexer import ann
from indexer.build import held_out_index
from search.gallery import Gallery


def check_recall(gallery_dir: str | os.PathLike[str], k: int | None = None) -> dict[str, Any]:
    """{"recall", "k", "sample", "index", "stored_recall"}: the gallery's index rebuilt without
    the build's held-out sample, searched with the stored settings (as long as a build)."""
    gallery = Gallery.load(gallery_dir)
    layout, info = gallery.layout, gallery.info
    tuning = dict(info.index.get("tuning") or {})
    k = int(k or tuning.get("k") or 8)
    built = held_out_index(layout, info, layout.manifest_files(info), info.index_type, k)
    if not len(built.queries):
        return {"recall": 1.0, "by_group": {}, "k": k, "sample": 0, "index": dict(info.index),
                "stored_recall": tuning.get("recall")}
    _, found = ann.search(built.index, gallery.search_settings, built.queries, k, gallery.store, gallery.positions,
                          threads=os.cpu_count() or 1, exclude=built.exclude)
    strangers = np.array([ids is not None for ids in built.exclude], bool)
    groups = {"strangers": strangers, "new_photos": ~strangers}
    recalls = {name: ann.recall_at_k(found[g], built.truth[g]) for name, g in groups.items() if g.any()}
    return {"recall": min(recalls.values()), "by_group": recalls, "k": k, "sample": len(built.queries),
            "index": dict(info.index), "stored_recall": tuning.get("recall")}
