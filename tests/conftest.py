"""Shared fixtures: the real data in ../shared/data and a small real gallery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))
CELEBA = SHARED / "celeba"
LFW = SHARED / "lfw"
PHOTOS = SHARED / "photos"


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    if not SHARED.is_dir():
        skip = pytest.mark.skip(reason=f"real data not found at {SHARED} (set FACESEARCH_SHARED_DATA)")
        for item in items:
            if "needs_data" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config):  # noqa: ANN001
    config.addinivalue_line("markers", "needs_data: reads ../shared/data")


@pytest.fixture(scope="session")
def celeba_gallery(tmp_path_factory):
    """300 CelebA test-split images indexed with the default pipeline, 2 workers."""
    from indexer import RunConfig, run_index

    out = tmp_path_factory.mktemp("celeba-gallery")
    config = RunConfig(dataset_root=str(CELEBA), format="celeba", split="test", limit=300, partition_size=100)
    summary = run_index(config, out, workers=2, progress=False)
    return out, summary


@pytest.fixture(scope="session")
def pipeline():
    from embedder import FacePipeline

    return FacePipeline()
