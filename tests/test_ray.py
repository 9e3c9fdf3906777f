"""The Ray engine on a real two-node Ray cluster on this machine gives the local engine's gallery, bit for bit:
from scratch, resuming, and when the worker node is killed mid-run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import CELEBA

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from indexer import RunConfig, run_index  # noqa: E402
from indexer.ray_engine import RayEngine  # noqa: E402

pytestmark = [pytest.mark.needs_data, pytest.mark.slow]

CONFIG = RunConfig(dataset_root=str(CELEBA), format="celeba", split="test", limit=300, partition_size=50)
PARTS = 6
#: a killed node is declared dead after about 1 s instead of 30 s
FAST_FAILURE = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 2}


@pytest.fixture(scope="module")
def local_gallery(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    run_index(CONFIG, out, workers=2, progress=False)
    return out


@pytest.fixture
def cluster():
    """A head node and a worker node, one CPU each (the machine has two)."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": FAST_FAILURE})
    session = cluster.head_node.session_name
    try:
        cluster.worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        _reap(session)


def _session_processes(session: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if session.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return pids


def _reap(session: str, grace: float = 30.0) -> None:
    """Workers of a killed node notice it within seconds; whatever of this cluster is left then is killed."""
    deadline = time.monotonic() + grace
    while _session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _running_tasks(node) -> list[str]:
    """The titles of the node's Ray processes ("ray::map_partition" while a worker runs that task, "ray::IDLE",
    agents)."""
    raylet = node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    titles = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            title = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == raylet and title.startswith("ray::") and title != "ray::IDLE":
            titles.append(title)
    return titles


def _files(gallery: Path, folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((gallery / folder).glob("*.parquet"))}


def _index_vectors(gallery: Path) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    info = json.loads((gallery / "gallery.json").read_text())
    index = faiss.read_index(str(gallery / info["index"]["file"]))
    ids = faiss.vector_to_array(index.id_map)
    return ids, np.stack([index.reconstruct(int(i)) for i in ids])


def assert_same_gallery(ray_gallery: Path, local_gallery: Path) -> None:
    """Manifest and failure parts byte for byte, the index's ids and vectors, gallery.json's counts."""
    for folder in ("manifest", "failures"):
        ours, theirs = _files(ray_gallery, folder), _files(local_gallery, folder)
        assert sorted(ours) == [f"part-{i:05d}.parquet" for i in range(PARTS)]
        assert sorted(ours) == sorted(theirs)
        for name in ours:
            assert ours[name] == theirs[name], f"{folder}/{name} differs"
        assert pq.read_table(ray_gallery / folder).equals(pq.read_table(local_gallery / folder))
    rows = pq.read_table(ray_gallery / "manifest").to_pydict()
    assert rows["face_id"] == list(range(len(rows["face_id"])))
    ours_ids, ours_vectors = _index_vectors(ray_gallery)
    theirs_ids, theirs_vectors = _index_vectors(local_gallery)
    assert np.array_equal(ours_ids, theirs_ids)
    assert np.array_equal(ours_vectors, theirs_vectors)
    ours_info, theirs_info = (json.loads((g / "gallery.json").read_text()) for g in (ray_gallery, local_gallery))
    assert ours_info["counts"] == theirs_info["counts"]
    assert ours_info["next_face_id"] == theirs_info["next_face_id"]
    assert ours_info["checksums"] == theirs_info["checksums"]  # every file of the generation, bit for bit
    assert not list(ray_gallery.rglob(".*.tmp-*"))


def test_ray_engine_equals_local_engine_and_resumes(cluster, local_gallery, tmp_path, caplog):
    out = tmp_path / "ray"
    with caplog.at_level(logging.INFO, logger="indexer"):
        summary = run_index(CONFIG, out, engine=RayEngine(address=cluster.address), progress=False)
    assert "Ray cluster of 2 nodes, 2 CPUs" in caplog.text
    assert summary.partitions_written == PARTS and summary.images_processed == 300
    assert not ray.is_initialized()  # the engine disconnected
    assert_same_gallery(out, local_gallery)
    faces = json.loads((out / "gallery.json").read_text())["counts"]
    assert summary.faces_written == faces["faces"] and summary.failures_written == faces["failures"]

    # Resume: parts 0, 1 and 3 are done (a gap, as when writes finished out of order); the rest is computed.
    resumed = tmp_path / "resumed"
    for folder in ("manifest", "failures"):
        (resumed / folder).mkdir(parents=True)
        for i in (0, 1, 3):
            shutil.copy(local_gallery / folder / f"part-{i:05d}.parquet", resumed / folder)
    shutil.copy(local_gallery / "run.json", resumed)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="indexer"):
        summary = run_index(CONFIG, resumed, engine=RayEngine(address=cluster.address), progress=False)
    assert "resuming: 3 of 6 partitions already done" in caplog.text
    assert summary.partitions_written == 3 and summary.images_processed == 150
    assert_same_gallery(resumed, local_gallery)


def test_worker_node_killed_mid_run(cluster, local_gallery, tmp_path):
    """``face-index run --engine ray`` joins the cluster; the worker node is killed once the
    first partition is written and a new node joins. Ray retries the lost tasks (and
    rebuilds lost results) and the gallery is still the local engine's, bit for bit."""
    out, log_file = tmp_path / "ray", tmp_path / "run.log"
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "indexer.cli", "run", str(CELEBA), "--format", "celeba", "--split", "test",
               "--limit", "300", "--partition-size", "50", "--no-progress", "--out", str(out),
               "--engine", "ray", "--ray-address", cluster.address]
    with open(log_file, "w") as stderr:
        driver = subprocess.Popen(command, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                                  stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 300
            while not (list((out / "manifest").glob("part-*.parquet"))
                       and "ray::map_partition" in _running_tasks(cluster.worker)):
                assert driver.poll() is None, log_file.read_text()[-3000:]
                assert time.monotonic() < deadline, "no partition written in 300 s"
                time.sleep(0.05)
            running_at_kill = _running_tasks(cluster.worker)
            written_at_kill = len(list((out / "manifest").glob("part-*.parquet")))
            cluster.remove_node(cluster.worker, allow_graceful=False)
            time.sleep(2)
            cluster.worker = cluster.add_node(num_cpus=1)
            assert driver.wait(timeout=600) == 0, log_file.read_text()[-3000:]
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    text = log_file.read_text()
    assert "Ray cluster of 2 nodes, 2 CPUs" in text
    assert 1 <= written_at_kill < PARTS, "the node was not killed mid-run"
    assert "ray::map_partition" in running_at_kill  # a partition was being computed there: Ray ran it again
    assert "done: 300 images" in text and "(6 partitions written, 0 already done)" in text, text[-3000:]
    assert_same_gallery(out, local_gallery)


def test_embedding_actors_equal_local_main_process_embedding(cluster, tmp_path):
    """The GPU layout (prepare tasks, then batched embedding on actors), on CPU actors here,
    equals the local engine's --embed-in main (workers stop at crops, batches of 64 faces)."""
    config = RunConfig(dataset_root=str(CELEBA), format="celeba", split="test", limit=60, partition_size=25)
    run_index(config, tmp_path / "local", workers=2, embed_in="main", progress=False)
    run_index(config, tmp_path / "ray", engine=RayEngine(address=cluster.address, embed_gpus=1, gpus_per_embedder=0),
              progress=False)
    local, ours = (pq.read_table(tmp_path / name / "manifest").to_pydict() for name in ("local", "ray"))
    for column in ("face_id", "path", "face_index", "box", "landmarks", "content_hash"):
        assert ours[column] == local[column], column
    np.testing.assert_allclose(np.array(ours["embedding"]), np.array(local["embedding"]), rtol=0, atol=1e-6)
    assert pq.read_table(tmp_path / "ray" / "failures").equals(pq.read_table(tmp_path / "local" / "failures"))


def test_a_node_that_does_not_see_the_gallery_is_refused(tmp_path, monkeypatch):
    """Workers check that they see the run's files (a shared filesystem) before computing."""
    from indexer import ray_engine

    spec = ray_engine.TaskSpec(dataset_root=str(CELEBA), pipeline=CONFIG.pipeline, max_pixels=1, gallery=str(tmp_path),
                               run_checksum="0" * 64, fingerprint=ray_engine.code_fingerprint(), dim=128)
    with pytest.raises(ray_engine.SharedStorageError, match="does not see this run's gallery"):
        ray_engine.check_node(spec, dataset=True)
    other = ray_engine.TaskSpec(**{**spec.__dict__, "fingerprint": "other"})
    with pytest.raises(ray_engine.NodeMismatchError, match="other facesearch code"):
        ray_engine.check_node(other, dataset=True)


def test_a_node_running_other_code_stops_the_run(cluster, tmp_path, monkeypatch):
    """The driver's fingerprint differs from the workers' (as when a node has another facesearch):
    the first task refuses, the run stops with that error, and nothing is written."""
    from indexer import ray_engine

    monkeypatch.setattr(ray_engine, "code_fingerprint", lambda: "not the workers' code")
    config = RunConfig(dataset_root=str(CELEBA), format="celeba", split="test", limit=4, partition_size=2)
    with pytest.raises(ray_engine.NodeMismatchError, match="runs other facesearch code"):
        run_index(config, tmp_path / "g", engine=RayEngine(address=cluster.address), progress=False)
    assert not list((tmp_path / "g").rglob("*.parquet"))
    assert not ray.is_initialized()
