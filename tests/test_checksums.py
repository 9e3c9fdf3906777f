"""Galleries carry checksums of their files, checked on open: corruption is a clear
error that names the file and the repair, never wrong answers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from indexer.cli import main as face_index
from indexer.layout import GalleryCorruptError, GalleryLayout
from search import Gallery, Searcher
from search.cli import main as face_search
from tests.conftest import PHOTOS

pytestmark = pytest.mark.needs_data


def _scramble(path, seed: int = 0) -> None:
    """Random bytes written inside the file, same size (what a bad disk or a stray write does)."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    at = rng.integers(len(data) // 4, len(data) - 64)
    data[at:at + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.fixture
def gallery(celeba_gallery, tmp_path):
    out = tmp_path / "gallery"
    shutil.copytree(celeba_gallery[0], out)
    return out


@pytest.mark.parametrize("target", ["index", "meta"])
def test_corrupt_search_files_are_named_and_rebuilt(gallery, target):
    queries = Gallery.load(gallery).embeddings()[:10]
    want = [[m.face_id for m in r] for r in Searcher(str(gallery)).search_vectors(queries, k=5)]
    info = GalleryLayout(gallery).read_info()
    index = gallery / (info.index_file if target == "index" else info.index["meta"])
    size = index.stat().st_size
    _scramble(index)
    assert index.stat().st_size == size
    with pytest.raises(GalleryCorruptError, match=f"{index.name} is corrupt.*face-index build"):
        Gallery.load(gallery)
    result = CliRunner().invoke(face_search, ["query", str(PHOTOS / "group1.jpg"), "--gallery", str(gallery)])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1
    assert f"{index.name} is corrupt" in result.output
    assert CliRunner().invoke(face_index, ["build", str(gallery)]).exit_code == 0  # reads only the manifest
    assert [[m.face_id for m in r] for r in Searcher(str(gallery)).search_vectors(queries, k=5)] == want


def test_corrupt_manifest_part_is_named_and_recovered_from_the_dataset(gallery):
    info = GalleryLayout(gallery).read_info()
    before = Gallery.load(gallery)
    faces = {(p, i) for p, i in zip(before.meta.column("path").to_pylist(), before.meta.column("face_index").to_pylist())}
    part = gallery / info.manifest[1]
    _scramble(part, seed=1)
    # searching reads the index and meta file, not the parts: it goes on; verify and every writer name the part
    assert len(Gallery.load(gallery)) == len(before)
    verify = CliRunner().invoke(face_index, ["verify", str(gallery)])
    assert verify.exit_code == 1 and f"{part.name} is corrupt" in verify.output and "--drop-missing" in verify.output
    added = CliRunner().invoke(face_index, ["remove", str(gallery), "--face-id", str(int(before.face_ids[0]))])
    assert added.exit_code == 1 and f"{part.name} is corrupt" in added.output
    refused = CliRunner().invoke(face_index, ["build", str(gallery)])
    assert refused.exit_code == 1 and "missing or corrupt" in refused.output and info.manifest[1] in refused.output
    assert CliRunner().invoke(face_index, ["build", str(gallery), "--drop-missing"]).exit_code == 0
    assert not part.exists()
    synced = CliRunner().invoke(face_index, ["sync", str(gallery), "--workers", "1"])
    assert synced.exit_code == 0, synced.output
    after = Gallery.load(gallery)
    assert {(p, i) for p, i in zip(after.meta.column("path").to_pylist(), after.meta.column("face_index").to_pylist())} == faces


def test_every_listed_file_has_a_checksum(gallery):
    info = json.loads((gallery / "gallery.json").read_text())
    listed = set(info["manifest"]) | set(info["failures"]) | {info["index"]["file"], info["index"]["meta"]}
    assert set(info["checksums"]) == listed
    assert all(v.startswith("sha256:") and len(v) == 71 for v in info["checksums"].values())
    assert CliRunner().invoke(face_index, ["verify", str(gallery)]).exit_code == 0
