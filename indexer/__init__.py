"""The offline batch job: a dataset becomes a gallery directory.

reader (partitions of records) -> mapper (image -> face rows, in worker
processes) -> writer (one Parquet partition, atomically) -> runner (resumes,
shows progress) -> build (FAISS index + gallery.json).

The names below are imported on first use, so that a worker process, which
needs only the mapper, does not load FAISS and the index code when it starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from indexer.build import build_gallery
    from indexer.config import RunConfig
    from indexer.runner import RunSummary, run_index

_EXPORTS = {
    "RunConfig": "indexer.config",
    "RunSummary": "indexer.runner",
    "build_gallery": "indexer.build",
    "run_index": "indexer.runner",
}

__all__ = ["RunConfig", "RunSummary", "build_gallery", "run_index"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'indexer' has no attribute {name!r}")
