"""Recall of a gallery's index, measured now: ``face-index check-recall``.

The same measurement the build's tuning makes (indexer/ann.py, indexer/build.py
``HeldOut``), on a seeded sample of the gallery's own vectors held out as queries
(half as new photos of people in the gallery, half as strangers), with the index's
stored settings: exact top-k over all vectors (streamed part by part) against what
the index answers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from indexer import ann
from indexer.build import HeldOut
from indexer.layout import embeddings_of, read_verified, row_count
from search.gallery import Gallery


def check_recall(gallery_dir: str | os.PathLike[str], sample: int | None = None, k: int | None = None,
                 seed: int = ann.TUNE_SEED) -> dict[str, Any]:
    """{"recall", "k", "sample", "index", "stored_recall"} for the gallery as it is on disk.
    By default the build's own sample (same seed and size): the stored recall is reproduced
    exactly; another ``seed`` or ``sample`` gives a fresh estimate."""
    gallery = Gallery.load(gallery_dir)
    layout, info = gallery.layout, gallery.info
    tuning = dict(info.index.get("tuning") or {})
    k = int(k or tuning.get("k") or 8)
    sample = int(sample or tuning.get("sample") or ann.TUNE_QUERIES)
    files = layout.manifest_files(info)
    counts = [row_count(f) for f in files]
    rows = ann.sample_rows(counts, sample, seed=seed)
    held_out = HeldOut()
    picked = []
    tables = lambda: (pq.read_table(pa.BufferReader(read_verified(layout, info, f)),  # noqa: E731
                                    columns=["face_id", "identity", "embedding"]) for f in files)
    for table, chosen in zip(tables(), rows):
        held_out.add_part(table, chosen)
        if len(chosen):
            picked.append(embeddings_of(table)[chosen])
    queries = np.ascontiguousarray(np.concatenate(picked)) if picked else np.zeros((0, gallery.dim), np.float32)
    truth = ann.ExactTopK(queries, k, *held_out.exclusions())
    for table in tables():
        truth.update(table.column("face_id").to_numpy().astype(np.int64), embeddings_of(table),
                     held_out.groups_of(table))
    _, found = ann.search(gallery.index, gallery.search_settings, queries, k, gallery.store, gallery.positions,
                          threads=os.cpu_count() or 1, exclude=held_out.excluded_ids())
    return {"recall": ann.recall_at_k(found, truth.ids), "k": k, "sample": len(queries), "index": dict(info.index),
            "stored_recall": tuning.get("recall")}
