"""Changing a served gallery: enrolment and deletion over HTTP, and readers that follow
changes made by other processes (a running service, the bot) without failing a request."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image

from search import Gallery
from tests.conftest import LFW, PHOTOS, REPO
from tests.test_service import _free_port

pytestmark = pytest.mark.needs_data
TOKEN = "change-token-456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BLAIR = LFW / "lfw" / "Tony_Blair"


def _start(gallery: Path, token: str | None, tmp_path: Path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "FACESEARCH_API_TOKEN"}
    if token:
        env["FACESEARCH_API_TOKEN"] = token
    log = open(tmp_path / f"server-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "serve", "--gallery", str(gallery), "--port", str(port),
                             "--concurrency", "2"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        assert proc.poll() is None, (tmp_path / f"server-{port}.log").read_text()
        time.sleep(0.3)
    proc.kill()
    pytest.fail("service not ready in 120 s")


@pytest.fixture
def gallery_copy(celeba_gallery, tmp_path):
    out = tmp_path / "gallery"
    shutil.copytree(celeba_gallery[0], out)
    return out


def _search(base: str, path: Path) -> dict:
    response = httpx.post(f"{base}/v1/search", files={"image": ("q.jpg", path.read_bytes(), "image/jpeg")},
                          data={"k": "5"}, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_enroll_and_delete_over_http(gallery_copy, tmp_path):
    proc, base = _start(gallery_copy, TOKEN, tmp_path)
    try:
        photo = (BLAIR / "Tony_Blair_0001.jpg").read_bytes()
        form = {"identity": "Tony Blair"}
        assert httpx.post(f"{base}/v1/faces", files={"image": ("a.jpg", photo)}, data=form).status_code == 401
        enrolled = httpx.post(f"{base}/v1/faces", files={"image": ("a.jpg", photo)}, data=form, headers=AUTH, timeout=60)
        assert enrolled.status_code == 201, enrolled.text
        ids, generation = enrolled.json()["face_ids"], enrolled.json()["generation"]
        assert len(ids) == 1 and ids[0] >= len(Gallery.load(gallery_copy)) - 1
        found = _search(base, BLAIR / "Tony_Blair_0002.jpg")
        assert found["generation"] == generation
        assert found["faces"][0]["matches"][0]["identity"] == "Tony Blair"
        assert httpx.get(f"{base}/v1/faces/{ids[0]}/thumbnail", headers=AUTH).headers["content-type"] == "image/jpeg"
        again = httpx.post(f"{base}/v1/faces", files={"image": ("a.jpg", photo)}, data=form, headers=AUTH, timeout=60)
        assert again.status_code == 409 and "already" in again.json()["detail"]
        blank = io.BytesIO()
        Image.new("RGB", (200, 200), (120, 160, 200)).save(blank, "JPEG")
        faceless = httpx.post(f"{base}/v1/faces", files={"image": ("b.jpg", blank.getvalue())}, data=form, headers=AUTH,
                              timeout=60)
        assert faceless.status_code == 422 and "no face" in faceless.json()["detail"]

        gone = httpx.delete(f"{base}/v1/identities/{quote('Tony Blair')}", headers=AUTH, timeout=60)
        assert gone.status_code == 200 and gone.json()["removed"] == 1
        after = _search(base, BLAIR / "Tony_Blair_0002.jpg")
        assert after["generation"] > generation
        assert "Tony Blair" not in {m["identity"] for f in after["faces"] for m in f["matches"]}
        assert not any((gallery_copy / "enrolled").iterdir())  # the stored upload went with its face
        assert httpx.get(f"{base}/v1/faces/{ids[0]}", headers=AUTH).status_code == 404
        assert httpx.delete(f"{base}/v1/faces/{ids[0]}", headers=AUTH).status_code == 404
        one = _search(base, PHOTOS / "group1.jpg")["faces"][0]["matches"][0]["face_id"]
        assert httpx.delete(f"{base}/v1/faces/{one}", headers=AUTH).json()["removed"] == 1
        assert httpx.get(f"{base}/v1/faces/{one}", headers=AUTH).status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_no_write_routes_without_a_token(gallery_copy, tmp_path):
    proc, base = _start(gallery_copy, None, tmp_path)
    try:
        photo = (BLAIR / "Tony_Blair_0001.jpg").read_bytes()
        response = httpx.post(f"{base}/v1/faces", files={"image": ("a.jpg", photo)}, data={"identity": "x"})
        assert response.status_code in (404, 405)
        assert httpx.delete(f"{base}/v1/faces/0").status_code in (404, 405)
        assert httpx.get(f"{base}/v1/faces/0").status_code == 200  # reads are still served
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_searches_stay_consistent_while_another_process_changes_the_gallery(gallery_copy, tmp_path):
    """20 clients search while face-index adds and removes faces: no request fails, and every
    answer equals exact search over the generation it names."""
    newcomers = tmp_path / "new"
    newcomers.mkdir()
    for image in sorted(BLAIR.iterdir())[:3]:
        shutil.copy(image, newcomers / image.name)
    proc, base = _start(gallery_copy, TOKEN, tmp_path)
    generations: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def record() -> None:
        g = Gallery.load(gallery_copy)
        generations[g.generation] = (g.face_ids.copy(), g.embeddings())

    record()
    rng = np.random.default_rng(3)
    queries = generations[min(generations)][1][rng.choice(len(generations[min(generations)][1]), 40)]
    queries = queries + rng.normal(0, 0.03, queries.shape).astype(np.float32)
    answers: list[tuple[int, int, list[int]]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        i = seed
        with httpx.Client(headers=AUTH, timeout=60) as http:
            while not stop.is_set():
                q = i % len(queries)
                try:
                    r = http.post(f"{base}/v1/search/vector", json={"vectors": [queries[q].tolist()], "k": 5})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        body = r.json()
                        answers.append((body["generation"], q, [m["face_id"] for m in body["results"][0]]))
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                i += 20

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    try:
        for _ in range(2):
            for command in (["add", str(gallery_copy), str(newcomers), "--identity", "Tony Blair"],
                            ["remove", str(gallery_copy), "--identity", "Tony Blair"]):
                done = subprocess.run([sys.executable, "-m", "indexer.cli", *command], cwd=REPO, capture_output=True,
                                      text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
                assert done.returncode == 0, done.stderr[-2000:]
                record()
                time.sleep(1.5)  # let the service pick it up while the clients keep searching
    finally:
        stop.set()
        for t in threads:
            t.join()
        proc.terminate()
        proc.wait(timeout=20)
    assert failures == []
    seen = {g for g, _, _ in answers}
    assert len(seen) >= 4, f"the service answered from generations {sorted(seen)} only"
    normed = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for generation, q, ids in answers:
        face_ids, vectors = generations[generation]
        expected = face_ids[np.argsort(-(vectors @ normed[q]), kind="stable")[:5]].tolist()
        assert ids == expected, (generation, q)


def test_bot_follows_changes(celeba_gallery, tmp_path):
    """The bot's answers follow a removal made by the CLI, without a restart."""
    from search.bot import BotSettings, FaceBot
    from search.searcher import Searcher

    gallery = tmp_path / "gallery"
    shutil.copytree(celeba_gallery[0], gallery)
    bot = FaceBot(Searcher(str(gallery)), BotSettings(gallery=str(gallery)))
    bot.live.watch(0.2)
    try:
        photo = (PHOTOS / "group1.jpg").read_bytes()
        before = bot.answer(photo)
        top = bot.live.snapshot().gallery.row(
            bot.searcher.search(np.asarray(Image.open(io.BytesIO(photo)).convert("RGB")), k=1)[0].matches[0].face_id)
        identity = top["identity"]
        done = subprocess.run([sys.executable, "-m", "indexer.cli", "remove", str(gallery), "--identity", identity],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr[-2000:]
        deadline = time.time() + 10
        while bot.live.snapshot().generation == 1 and time.time() < deadline:
            time.sleep(0.1)
        assert bot.live.snapshot().generation == 2
        results = bot.searcher.search(np.asarray(Image.open(io.BytesIO(photo)).convert("RGB")), k=8,
                                      gallery=bot.live.snapshot().gallery)
        assert identity not in {m.identity for r in results for m in r.matches}
        assert len(bot.answer(photo)) == len(before)
    finally:
        bot.live.stop()
