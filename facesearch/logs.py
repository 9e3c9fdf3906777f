"""Logging and process-wide switches, set once where a process starts (a CLI or a worker)."""

from __future__ import annotations

import logging
import os


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """One format for all command-line tools: -v for debug, -q for warnings only."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # faiss logs its SIMD probing at INFO; it is noise for users.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    # Intel OpenMP (faiss, torch) warns about deprecated settings on every start.
    os.environ.setdefault("KMP_WARNINGS", "0")
