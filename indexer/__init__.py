"""The offline batch job: a dataset becomes a gallery directory.

reader (partitions of records) -> mapper (image -> face rows, in worker
processes) -> writer (one Parquet partition, atomically) -> runner (resumes,
shows progress) -> build (FAISS index + gallery.json).
"""

from indexer.build import build_gallery
from indexer.config import RunConfig
from indexer.runner import RunSummary, run_index

__all__ = ["RunConfig", "RunSummary", "build_gallery", "run_index"]
