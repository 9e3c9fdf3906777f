"""A gallery that lives: add, remove, sync, crash safety, the writer lock, erasure without trace.

Real faces: a folder-per-person copy of 10 LFW people (the dataset root, in tmp),
indexed once per session and copied for each test.
"""

from __future__ import annotations

import json
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
from click.testing import CliRunner

from indexer.cli import main as face_index
from indexer.layout import GalleryLayout
from search.gallery import Gallery
from search.searcher import Searcher
from tests.conftest import LFW

pytestmark = pytest.mark.needs_data

REPO = Path(__file__).resolve().parents[1]
PEOPLE = ["Arnold_Schwarzenegger", "Colin_Powell", "Gloria_Macapagal_Arroyo", "Jean_Chretien", "John_Ashcroft",
          "Junichiro_Koizumi", "Laura_Bush", "Lleyton_Hewitt", "Serena_Williams", "Vladimir_Putin"]
PER_PERSON = 6
ERASED = "Laura_Bush"
NEWCOMER = "Tony_Blair"  # never in the dataset: added from outside it


def _copy_people(root: Path, people: list[str], per_person: int = PER_PERSON) -> None:
    for person in people:
        (root / person).mkdir(parents=True, exist_ok=True)
        for image in sorted((LFW / "lfw" / person).iterdir())[:per_person]:
            shutil.copy(image, root / person / image.name)


def _run(*args: str) -> str:
    result = CliRunner().invoke(face_index, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture(scope="session")
def lfw_base(tmp_path_factory):
    """(dataset root, built gallery) for 60 images of 10 LFW people, never modified."""
    base = tmp_path_factory.mktemp("lifecycle")
    dataset = base / "dataset"
    _copy_people(dataset, PEOPLE)
    _run("run", str(dataset), "--format", "folders", "--out", str(base / "gallery"), "--workers", "2", "--no-progress",
         "--partition-size", "10")
    return dataset, base / "gallery"


@pytest.fixture
def lfw(lfw_base, tmp_path):
    """A private copy of the dataset and its gallery (gallery.json points at the copy)."""
    dataset, gallery = lfw_base
    shutil.copytree(dataset, tmp_path / "dataset")
    shutil.copytree(gallery, tmp_path / "gallery")
    for name in ("gallery.json", "run.json"):
        path = tmp_path / "gallery" / name
        path.write_text(path.read_text().replace(str(dataset), str(tmp_path / "dataset")))
    return tmp_path / "dataset", tmp_path / "gallery"


def state(gallery: Path) -> dict:
    """Everything a gallery answers with: generation, faces (id, path, embedding), failures, index vectors."""
    g = Gallery.load(gallery)
    table = g.read_columns(["face_id", "path", "identity", "face_index", "embedding"])
    embeddings = g.embeddings()
    failures = sorted(p for f in g.layout.failure_files(g.info) for p in pq.read_table(f).column("path").to_pylist())
    ids = table.column("face_id").to_numpy()
    vectors = np.stack([g.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, g.dim))
    return {
        "generation": g.generation,
        "faces": list(zip(ids.tolist(), table.column("path").to_pylist(), table.column("identity").to_pylist(),
                          table.column("face_index").to_pylist())),
        "embeddings": embeddings.tobytes(),
        "index": vectors.astype(np.float32).tobytes(),
        "failures": failures,
    }


def test_remove_identity_leaves_no_trace(lfw):
    dataset, gallery = lfw
    # derived pages and figures that show her: eval (calibration, figures) and audit
    from search.cli import main as face_search

    for args in (["eval", str(gallery)], ["audit", str(gallery)]):
        result = CliRunner().invoke(face_search, args)
        assert result.exit_code == 0, (result.output, result.exception)
    assert ERASED in (gallery / "audit.html").read_text() or (gallery / "eval" / "roc.png").exists()
    before = Gallery.load(gallery)
    rows = before.read_columns(["face_id", "path", "identity"])
    mine = [i for i, who in enumerate(rows.column("identity").to_pylist()) if who == ERASED]
    assert len(mine) >= 5
    removed_paths = sorted({rows.column("path")[i].as_py() for i in mine})
    removed_vectors = before.embeddings()[mine]

    out = _run("remove", str(gallery), "--identity", ERASED)
    assert f"{len(mine)} removed" in out

    # search with each of her images: she never comes back
    searcher = Searcher(str(gallery))
    assert len(searcher.gallery) == len(rows) - len(mine)
    from data.images import load_image

    for path in removed_paths:
        for face in searcher.search(load_image(dataset / path), k=len(searcher.gallery)):
            assert ERASED not in {m.identity for m in face.matches}
    # no file under the gallery holds her paths, her name or her embeddings' bytes
    needles = [p.encode() for p in removed_paths] + [ERASED.encode()] + [v.astype(np.float32).tobytes() for v in removed_vectors]
    files = [p for p in gallery.rglob("*") if p.is_file()]
    assert any(p.suffix == ".faiss" for p in files) and any(p.suffix == ".parquet" for p in files)
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{path.name} still holds {needle[:40]!r}"
        if path.suffix == ".parquet":  # compressed pages: look at the decoded rows too
            table = pq.read_table(path)
            for column in ("path", "identity"):
                if column in table.column_names:
                    assert not {ERASED, *removed_paths} & set(table.column(column).to_pylist()), path
    assert not (gallery / "audit.html").exists() and not (gallery / "eval").exists()
    info = GalleryLayout(gallery).read_info()
    assert info.calibration["stale"]["faces_removed"] == len(mine)
    log = [json.loads(line) for line in (gallery / "changes.log").read_text().splitlines()]
    assert log[-1]["operation"] == "remove" and log[-1]["faces_removed"] == len(mine)


def test_add_then_remove_restores_search(lfw, tmp_path):
    dataset, gallery = lfw
    original = Gallery.load(gallery)
    rng = np.random.default_rng(0)
    queries = original.embeddings()[rng.choice(len(original), 50, replace=False)]
    queries = queries + rng.normal(0, 0.05, queries.shape).astype(np.float32)
    want = Searcher(original).search_vectors(queries, k=8)

    newcomer = tmp_path / "new"
    _copy_people(newcomer, [NEWCOMER], per_person=5)
    out = _run("add", str(gallery), str(newcomer), "--identity", "Tony Blair")
    assert "5 faces added" in out or "faces added" in out
    grown = Gallery.load(gallery)
    assert len(grown) > len(original)
    new_ids = sorted(set(grown.face_ids.tolist()) - set(original.face_ids.tolist()))
    assert min(new_ids) > int(original.face_ids.max())  # new ids come after every id ever used
    assert grown.row(new_ids[0])["identity"] == "Tony Blair"
    assert os.path.isabs(grown.row(new_ids[0])["path"])  # outside the dataset: kept as added
    # the same content again is a no-op that says so
    again = _run("add", str(gallery), str(newcomer / NEWCOMER / sorted(os.listdir(newcomer / NEWCOMER))[0]))
    assert "already in the gallery" in again and "nothing changed" in again

    _run("remove", str(gallery), "--identity", "Tony Blair")
    back = Gallery.load(gallery)
    got = Searcher(back).search_vectors(queries, k=8)
    assert [[(m.face_id, round(m.cosine, 5)) for m in row] for row in got] == \
        [[(m.face_id, round(m.cosine, 5)) for m in row] for row in want]
    # removed ids are not reused
    _run("add", str(gallery), str(newcomer / NEWCOMER))
    assert int(Gallery.load(gallery).face_ids.min(initial=0)) >= 0
    assert set(Gallery.load(gallery).face_ids.tolist()).isdisjoint(new_ids)


def test_sync_equals_a_fresh_run(lfw, tmp_path):
    dataset, gallery = lfw
    shutil.rmtree(dataset / "Colin_Powell")                       # vanished
    _copy_people(dataset, ["Aaron_Peirsol"], per_person=4)          # new, sorts before everything
    victim = sorted((dataset / "Serena_Williams").iterdir())[0]
    shutil.copy(LFW / "lfw" / "Tony_Blair" / "Tony_Blair_0001.jpg", victim)  # changed content, same name

    rerun = CliRunner().invoke(face_index, ["run", str(dataset), "--format", "folders", "--out", str(gallery),
                                            "--workers", "0", "--no-progress", "--partition-size", "10"])
    assert rerun.exit_code == 1 and "face-index sync" in rerun.output and "4 new" in rerun.output

    out = _run("sync", str(gallery), "--workers", "0")
    assert "4 new, 6 vanished, 1 changed" in out
    fresh = tmp_path / "fresh"
    _run("run", str(dataset), "--format", "folders", "--out", str(fresh), "--workers", "0", "--no-progress")

    def by_path(g: Gallery) -> dict:
        t = g.read_columns(["path", "face_index", "identity"])
        e = g.embeddings()
        return {(p, i): (who, e[k]) for k, (p, i, who) in enumerate(zip(
            t.column("path").to_pylist(), t.column("face_index").to_pylist(), t.column("identity").to_pylist()))}

    synced, clean = by_path(Gallery.load(gallery)), by_path(Gallery.load(fresh))
    assert synced.keys() == clean.keys()
    for key in clean:
        assert synced[key][0] == clean[key][0]
        assert np.abs(synced[key][1] - clean[key][1]).max() < 1e-5
    assert state(gallery)["failures"] == state(fresh)["failures"]
    assert "up to date" in _run("run", str(dataset), "--format", "folders", "--out", str(gallery), "--no-progress",
                                "--partition-size", "10")


def test_build_refuses_to_drop_missing_parts(lfw):
    dataset, gallery = lfw
    info = GalleryLayout(gallery).read_info()
    lost = gallery / info.manifest[0]
    before = state(gallery)
    lost.unlink()
    result = CliRunner().invoke(face_index, ["build", str(gallery)])
    assert result.exit_code == 1 and info.manifest[0] in result.output and "--drop-missing" in result.output
    _run("build", str(gallery), "--drop-missing")
    assert len(Gallery.load(gallery)) < len(before["faces"])
    _run("sync", str(gallery), "--workers", "0")  # re-adds the lost images from the dataset
    assert {f[1:] for f in state(gallery)["faces"]} == {f[1:] for f in before["faces"]}


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "indexer.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=timeout)


@pytest.mark.parametrize("fault", ["before-index", "before-commit", "after-commit"])
def test_crash_during_a_change_leaves_before_or_after(lfw, tmp_path, fault):
    """SIGKILL at each step of a change: the gallery opens as exactly the state before or after it."""
    dataset, gallery = lfw
    shutil.copytree(gallery, tmp_path / "after")
    before = state(gallery)
    shutil.rmtree(dataset / "Jean_Chretien")
    _copy_people(dataset, ["Aaron_Peirsol"], per_person=2)
    done = _cli("sync", str(tmp_path / "after"), "--workers", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    after = state(tmp_path / "after")

    crashed = _cli("sync", str(gallery), "--workers", "0", env={"FACESEARCH_FAULT": fault})
    assert crashed.returncode == -signal.SIGKILL
    now = state(gallery)
    assert now == (after if fault == "after-commit" else before)
    finish = _cli("sync", str(gallery), "--workers", "0")  # the next writer cleans up and finishes the job
    assert finish.returncode == 0, finish.stderr[-2000:]
    final = state(gallery)
    assert final["faces"] == after["faces"] and final["embeddings"] == after["embeddings"]
    listed = {str(p) for p in GalleryLayout(gallery).manifest_files(GalleryLayout(gallery).read_info())}
    assert {str(p) for p in (gallery / "manifest").glob("*.parquet")} == listed  # nothing left behind


def test_random_sigkill_during_add_and_remove(lfw, tmp_path):
    """SIGKILL at a random moment (3 trials each): before or after, exactly."""
    dataset, gallery = lfw
    newcomer = tmp_path / "new"
    _copy_people(newcomer, [NEWCOMER], per_person=3)
    rng = np.random.default_rng(7)
    for command in (["add", str(gallery), str(newcomer), "--identity", "Tony Blair"],
                    ["remove", str(gallery), "--identity", "Tony Blair"]):
        before = state(gallery)
        reference = tmp_path / "reference"
        shutil.rmtree(reference, ignore_errors=True)
        shutil.copytree(gallery, reference)
        start = time.monotonic()
        assert _cli(*[str(reference) if a == str(gallery) else a for a in command]).returncode == 0
        duration = time.monotonic() - start
        after = state(reference)
        for _ in range(3):
            proc = subprocess.Popen([sys.executable, "-m", "indexer.cli", *command], cwd=REPO,
                                    env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.5, 1.0) * duration)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert state(gallery) in (before, after)
        if state(gallery) != after:
            assert _cli(*command).returncode == 0
        assert state(gallery) == after


def test_writer_lock_names_its_holder_and_is_taken_over_when_stale(lfw, tmp_path):
    dataset, gallery = lfw
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from indexer.lock import WriterLock; "
         f"WriterLock({str(gallery)!r}, 'face-index sync').acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        blocked = CliRunner().invoke(face_index, ["remove", str(gallery), "--face-id", "0"])
        assert blocked.exit_code == 1
        assert f"pid {holder.pid}" in blocked.output and "face-index sync" in blocked.output
        run = CliRunner().invoke(face_index, ["run", str(dataset), "--format", "folders", "--out", str(gallery),
                                              "--partition-size", "10"])
        assert run.exit_code == 1 and "being changed by another process" in run.output
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is taken over
    out = _run("remove", str(gallery), "--face-id", "0")
    assert "1 removed" in out
    with pytest.raises(KeyError):
        Gallery.load(gallery).row(0)


def test_remove_unknown_and_dry_run_change_nothing(lfw):
    dataset, gallery = lfw
    before = state(gallery)
    missing = CliRunner().invoke(face_index, ["remove", str(gallery), "--identity", "Nobody_At_All"])
    assert missing.exit_code == 1 and "not in this gallery" in missing.output
    dry = _run("remove", str(gallery), "--identity", "Vladimir_Putin", "--dry-run")
    assert "would remove 6 faces" in dry or "would remove" in dry
    assert state(gallery) == before


def _downgrade_to_format_1(gallery: Path) -> None:
    """Rewrite a fresh gallery as facesearch wrote them before lifecycle changes (format 1):
    no file list, index.faiss with row ids, parts without content_hash and kind."""
    import faiss

    layout = GalleryLayout(gallery)
    info = json.loads(layout.info_file.read_text())
    vectors = Gallery.load(gallery).embeddings()
    for folder in ("manifest", "failures"):
        for part in (gallery / folder).glob("*.parquet"):
            table = pq.read_table(part)
            pq.write_table(table.drop_columns([c for c in ("content_hash", "kind") if c in table.column_names]), part)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    faiss.write_index(flat, str(gallery / "index.faiss"))
    (gallery / info["index"]["file"]).unlink()
    for key in ("manifest", "failures", "generation", "next_face_id", "updated", "checksums"):
        info.pop(key, None)
    info["format_version"] = 1
    info["index"] = {"type": "flat", "faiss_metric": "inner_product", "ntotal": int(flat.ntotal)}
    (gallery / "pipeline.json").unlink()
    layout.info_file.write_text(json.dumps(info))


def test_format_1_galleries_open_search_and_change(lfw):
    dataset, gallery = lfw
    queries = Gallery.load(gallery).embeddings()[:20]
    want = [[(m.face_id, round(m.cosine, 5)) for m in r] for r in Searcher(str(gallery)).search_vectors(queries, k=5)]
    _downgrade_to_format_1(gallery)
    old = Gallery.load(gallery)
    assert old.info.format_version == 1 and old.info.manifest is None
    assert [[(m.face_id, round(m.cosine, 5)) for m in r] for r in Searcher(old).search_vectors(queries, k=5)] == want
    _run("remove", str(gallery), "--identity", "Vladimir_Putin")  # the first change writes format 2
    new = Gallery.load(gallery)
    assert new.info.format_version == 2 and not (gallery / "index.faiss").exists()
    assert "Vladimir_Putin" not in set(new.meta.column("identity").to_pylist())
    kept = [[(i, c) for i, c in row if new.has(i)] for row in want]
    got = [[(m.face_id, round(m.cosine, 5)) for m in r] for r in Searcher(new).search_vectors(queries, k=5)]
    assert all(g[: len(k)] == k for g, k in zip(got, kept))


def test_add_a_folder_with_a_name_that_is_not_utf8(lfw, tmp_path):
    dataset, gallery = lfw
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(LFW / "lfw" / NEWCOMER / "Tony_Blair_0001.jpg", folder / "ok.jpg")
    shutil.copy(LFW / "lfw" / NEWCOMER / "Tony_Blair_0002.jpg", os.fsencode(folder) + b"/bad\xff.jpg")
    out = _run("add", str(gallery), str(folder), "--identity", "Tony Blair")
    assert "1 faces added" in out and "1 without a face" in out
    failures = pq.read_table(gallery / GalleryLayout(gallery).read_info().failures[-1]).to_pylist()
    assert failures[0]["path"].endswith("bad\\xff.jpg") and "not valid UTF-8" in failures[0]["reason"]
    again = _run("add", str(gallery), str(folder), "--identity", "Tony Blair")
    assert "nothing changed" in again
