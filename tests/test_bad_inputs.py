"""The reliability suite: index the bad-inputs corpus (tests/bad_inputs.py) with the
CLI, check every entry against its expected outcome, then rerun: up to date, no error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data.readers import display_path, read_folder
from data.records import LOAD_ERROR, ImageRecord
from indexer.mapper import FaceMapper
from embedder.pipeline import PipelineConfig
from tests.bad_inputs import make_corpus

pytestmark = pytest.mark.needs_data

REPO = Path(__file__).resolve().parents[1]


def _face_index(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "indexer.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def _every_entry(root: Path) -> set[str]:
    """Every path below ``root`` that is not a plain folder (files, links, fifos), without
    following links or entering hidden folders, as the listing shows paths; plus hidden folders."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in [d for d in dirnames if d.startswith(".") or os.path.islink(os.path.join(dirpath, d))]:
            found.add(display_path((rel / name).as_posix()))
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d))]
        found.update(display_path((rel / name).as_posix()) for name in filenames)
    return found


def test_bad_inputs_corpus_indexes_as_expected_and_reruns_cleanly(tmp_path):
    corpus, gallery = tmp_path / "corpus", tmp_path / "gallery"
    expect = make_corpus(corpus)
    command = ["run", str(corpus), "--format", "folder", "--out", str(gallery), "--workers", "1",
               "--partition-size", "8", "--no-progress"]
    first = _face_index(*command)
    assert first.returncode == 0, first.stderr[-3000:]

    manifest = pq.read_table(gallery / "manifest").to_pydict()
    failures = pq.read_table(gallery / "failures").to_pylist()
    listing = read_folder(corpus)
    faces: dict[str, int] = {}
    for path in manifest["path"]:
        faces[path] = faces.get(path, 0) + 1
    failed = {f["path"]: f for f in failures}
    skipped = {s.path: s for s in listing.skipped}

    # Every entry is in exactly one place: manifest, failures or skipped; nothing else is.
    assert not (set(faces) & set(failed)) and not (set(faces) | set(failed)) & set(skipped)
    assert set(faces) | set(failed) | set(skipped) == set(expect)
    assert _every_entry(corpus) <= set(expect)
    for path, expected in expect.items():
        if expected.faces is not None:
            assert faces.get(path) == expected.faces, (path, failed.get(path))
        elif expected.kind is not None:
            assert path in failed, (path, faces.get(path), skipped.get(path))
            assert failed[path]["kind"] == expected.kind, (path, failed[path])
            assert expected.text in failed[path]["reason"], (path, failed[path])
        else:
            assert path in skipped, path
            assert skipped[path].reason == expected.skipped, (path, skipped[path])
            assert expected.text in skipped[path].detail, (path, skipped[path])
    # A load failure whose bytes were read keeps their hash (a fixed file is then seen as changed);
    # the file whose name is not UTF-8 is never opened.
    assert failed["corrupt.jpg"]["content_hash"] and failed["bad\\xff.jpg"]["content_hash"] is None

    # Said in the log: one summary line for what was skipped, a warning for the loop.
    summary = next(line for line in first.stderr.splitlines() if f"skipped 7 paths below {corpus}:" in line)
    assert "WARNING" in summary and "1 symlink loop" in summary and "(.txt, none)" in summary
    assert "symlink loop at" in first.stderr and "loop" in first.stderr

    # The same command again: up to date, no error, no warning about hashes; sync sees no change.
    again = _face_index(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is up to date with its dataset" in again.stdout
    assert "Error" not in again.stderr and "content hashes" not in again.stderr
    sync = _face_index("sync", str(gallery), "--dry-run", "--workers", "0")
    assert sync.returncode == 0, sync.stderr[-3000:]
    assert "dataset: 0 new, 0 vanished, 0 changed" in sync.stdout

    # An interrupted run resumes past the partition that holds the name that is not UTF-8.
    assert "bad\\xff.jpg" in pq.read_table(gallery / "failures" / "part-00000.parquet").column("path").to_pylist()
    for leftover in [gallery / "gallery.json", gallery / "manifest" / "part-00002.parquet", *gallery.glob("index*")]:
        leftover.unlink()
    resumed = _face_index(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming: 2 of 3 partitions already done" in resumed.stderr
    assert pq.read_table(gallery / "manifest").to_pydict()["path"] == manifest["path"]


def test_mapper_records_a_load_failure_without_opening_the_file(tmp_path):
    record = ImageRecord("gone\\xff.jpg", annotations={LOAD_ERROR: "file name is not valid UTF-8 (shown with \\x escapes)"})
    mapper = FaceMapper(str(tmp_path), PipelineConfig(), max_pixels=1000)
    [prepared] = mapper.prepare([record])
    assert mapper._pipeline is None  # nothing was decoded, so no pipeline was needed
    failure = prepared.failure
    assert (failure.path, failure.stage, failure.kind) == ("gone\\xff.jpg", "load", "load_error")
    assert failure.reason.startswith("file name is not valid UTF-8")
