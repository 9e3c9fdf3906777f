"""An index run killed with SIGKILL midway resumes to exactly the clean result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import CELEBA

pytestmark = pytest.mark.needs_data


def _cmd(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "indexer.cli", "run", str(CELEBA), "--format", "celeba", "--split", "test",
        "--limit", "60", "--partition-size", "10", "--workers", "1", "--no-progress", "--out", str(out),
    ]


def _table(out: Path, folder: str):
    return pq.read_table(out / folder).to_pydict()


def test_sigkill_then_rerun_equals_clean_run(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed), cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(list((killed / "manifest").glob("part-*.parquet"))) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes
    proc.wait(timeout=30)
    done_at_kill = len(list((killed / "manifest").glob("part-*.parquet")))
    assert 2 <= done_at_kill < 6, "the kill did not land midway"
    assert not (killed / "gallery.json").exists()

    rerun = subprocess.run(_cmd(killed), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{done_at_kill} already done" in rerun.stderr

    clean = tmp_path / "clean"
    fresh = subprocess.run(_cmd(clean), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]

    for folder in ("manifest", "failures"):
        assert _table(killed, folder) == _table(clean, folder)
    rows = _table(clean, "manifest")
    assert rows["face_id"] == list(range(len(rows["face_id"])))
    assert len(set(zip(rows["path"], rows["face_index"]))) == len(rows["path"])  # no duplicates
    assert not list(killed.rglob(".*.tmp-*"))  # no temporary left behind


def test_rerun_with_other_settings_is_refused(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = tmp_path / "g"
    first = subprocess.run(_cmd(out)[:-2] + ["--limit", "5", "--out", str(out)], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    other = subprocess.run(_cmd(out)[:-2] + ["--limit", "6", "--out", str(out)], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 1
    assert "Error: " in other.stderr and "limit differ" in other.stderr and "--overwrite" in other.stderr
    assert "Traceback" not in other.stderr


def test_ctrl_c_stops_cleanly_and_rerun_finishes(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = tmp_path / "g"
    cmd = _cmd(out)[:-2] + ["--limit", "30", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "manifest").glob("part-*.parquet")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before Ctrl-C landed")
    assert proc.returncode == 1 and "interrupted; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    rerun = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = pq.read_table(out / "manifest").to_pydict()
    assert rows["face_id"] == list(range(len(rows["face_id"])))
    info = (out / "gallery.json").read_text()
    assert '"images": 30' in info


def test_overwrite_with_bad_settings_loses_nothing(tmp_path):
    """A typo in --overwrite's run must not delete the gallery it would replace."""
    from indexer import RunConfig, run_index
    from embedder.pipeline import PipelineConfig
    from embedder.registry import UnknownBackendError

    out = tmp_path / "g"
    run_index(RunConfig(dataset_root=str(CELEBA), format="celeba", split="test", limit=4), out, workers=0, progress=False)
    before = sorted(p.name for p in out.rglob("*"))
    bad = RunConfig(dataset_root=str(CELEBA), format="celeba", split="test", limit=4,
                    pipeline=PipelineConfig(detector="dlib-hogg"))
    with pytest.raises(UnknownBackendError):
        run_index(bad, out, workers=0, overwrite=True, progress=False)
    assert sorted(p.name for p in out.rglob("*")) == before


def test_embedding_in_main_process_equals_embedding_in_workers(tmp_path, caplog):
    """--embed-in main (workers stop at crops, this process embeds batches: the
    GPU layout) gives the same gallery as embedding in the workers. Only a batched
    embedder (torch) embeds in the main process; the default ONNX one always embeds
    in the workers."""
    from embedder.pipeline import PipelineConfig
    from indexer import RunConfig, run_index

    config = RunConfig(dataset_root=str(CELEBA), format="celeba", split="test", limit=24, partition_size=10,
                       pipeline=PipelineConfig(embedder="dlib-resnet-torch"))
    tables = {}
    for mode, where in (("main", "the main process"), ("workers", "the workers")):
        caplog.clear()
        with caplog.at_level("DEBUG", logger="indexer.runner"):
            run_index(config, tmp_path / mode, workers=2, embed_in=mode, progress=False)
        assert f"embedding in {where}" in caplog.text
        tables[mode] = pq.read_table(tmp_path / mode / "manifest").to_pydict()
    main, workers = tables["main"], tables["workers"]
    assert len(main["face_id"]) >= 20
    for column in ("face_id", "path", "identity", "face_index", "box", "landmarks"):
        assert main[column] == workers[column], column
    import numpy as np

    np.testing.assert_allclose(np.array(main["embedding"]), np.array(workers["embedding"]), atol=1e-5)
    with pytest.raises(ValueError, match="embed_in must be"):
        run_index(config, tmp_path / "bad", embed_in="gpu", progress=False)
    assert not (tmp_path / "bad").exists()  # refused before anything was written
