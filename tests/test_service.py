"""The HTTP service as a real uvicorn process on 127.0.0.1, called over HTTP with real images."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from data.readers import read_celeba
from facesearch.errors import BackendError, ConfigurationError, FaceSearchError, GalleryError, ImageError, NotFoundError
from search import Gallery
from search.service import ServiceSettings, add_error_handler, create_app
from tests.conftest import CELEBA, PHOTOS, REPO

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(celeba_gallery, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("service") / "server.log"
    env = {**os.environ, "FACESEARCH_API_TOKEN": TOKEN}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.cli", "serve", "--gallery", str(celeba_gallery[0]), "--port", str(port),
             "--max-upload-mb", "1", "--max-pixels", "3000000", "--max-k", "50", "--concurrency", "2"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.3)
        else:
            proc.kill()
            pytest.fail(f"service not ready in 120 s:\n{log_path.read_text()}")
        yield base, log_path
        proc.terminate()
        proc.wait(timeout=20)


def _unseen_queries(gallery_dir, n: int = 12):
    """CelebA images not in the gallery whose identity is in it: (bytes, identity)."""
    gallery = Gallery.load(gallery_dir)
    indexed = set(gallery.meta.column("path").to_pylist())
    identities = set(gallery.meta.column("identity").to_pylist())
    listing = read_celeba(CELEBA, split="test")
    out = [(r.path, r.identity) for r in listing.records if r.path not in indexed and r.identity in identities]
    return [((CELEBA / p).read_bytes(), ident) for p, ident in out[:n]]


def _search(base, data: bytes, **form):
    return httpx.post(f"{base}/v1/search", files={"image": ("q.jpg", data, "image/jpeg")},
                      data={k: str(v) for k, v in form.items()}, headers=AUTH, timeout=60)


@pytest.mark.parametrize(("error", "status"), [
    (FaceSearchError("a request facesearch cannot answer"), 400),
    (ConfigurationError("k and max_k disagree"), 422),
    (ImageError("truncated JPEG"), 422),
    (GalleryError("gallery/ has no index.faiss: run face-index build gallery/"), 409),
    (BackendError("the dlib weights are missing"), 503),
    (NotFoundError("no face 9 in this gallery of 3"), 404),
])
def test_error_handler_answers_domain_errors(error, status):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    add_error_handler(app)

    @app.get("/domain")
    async def domain() -> None:
        raise error

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("not a domain error")

    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/domain")
    assert r.status_code == status
    assert r.json() == {"detail": error.args[0]}  # the one-line message as written (a KeyError would quote it)
    assert client.get("/bug").status_code == 500  # only the FaceSearchError family is mapped


def test_app_before_the_gallery_is_loaded(monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("FACESEARCH_API_TOKEN", TOKEN)
    app = create_app(ServiceSettings(gallery="never-loaded"))
    client = TestClient(app)  # not entered as a context, so the lifespan (which loads the gallery) never runs
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 503
    assert client.get("/v1/faces/0").status_code == 401  # the token came from the environment
    loading = client.get("/v1/faces/0", headers=AUTH)
    assert loading.status_code == 503 and loading.json() == {"detail": "the gallery is still loading"}
    assert client.post("/v1/search/vector", json={"vectors": [], "k": 0}, headers=AUTH).status_code == 422  # k first


def test_settings_resolve_defaults_when_used(monkeypatch):
    monkeypatch.setenv("FACESEARCH_API_TOKEN", "from-env")
    settings = ServiceSettings(gallery="g")
    assert settings.concurrency is None and settings.search_slots() == max(1, os.cpu_count() or 1)
    assert ServiceSettings(gallery="g", concurrency=3).search_slots() == 3
    assert settings.api_token() == "from-env" and ServiceSettings(gallery="g", token="").api_token() == ""


@pytest.mark.needs_data
def test_health_docs_and_auth(server):
    base, _ = server
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").json()["faces"] > 250
    spec = httpx.get(f"{base}/openapi.json").json()
    assert {"/v1/search", "/v1/search/vector", "/v1/faces/{face_id}", "/v1/faces/{face_id}/thumbnail"} <= set(spec["paths"])
    docs = httpx.get(f"{base}/docs")
    assert docs.status_code == 200 and "/static/swagger/swagger-ui-bundle.js" in docs.text  # no CDN: works offline
    js = httpx.get(f"{base}/static/swagger/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 500_000
    data = (PHOTOS / "group1.jpg").read_bytes()
    no_token = httpx.post(f"{base}/v1/search", files={"image": ("q.jpg", data, "image/jpeg")})
    assert no_token.status_code == 401
    wrong = httpx.get(f"{base}/v1/faces/0", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


@pytest.mark.needs_data
def test_search_finds_the_person(server, celeba_gallery):
    base, _ = server
    hits = 0
    queries = _unseen_queries(celeba_gallery[0])
    for data, identity in queries:
        r = _search(base, data, k=5)
        assert r.status_code == 200, r.text
        body = r.json()
        faces = body["faces"]
        if faces:
            m = faces[0]["matches"]
            assert len(m) == 5 and m[0]["cosine"] >= m[-1]["cosine"]
            assert set(m[0]) >= {"face_id", "cosine", "identity", "path", "box", "verdict"}
            hits += m[0]["identity"] == identity
    assert hits >= len(queries) * 0.7
    # threshold drops the weaker matches
    r = _search(base, queries[0][0], k=8, threshold=0.99)
    assert all(m["cosine"] >= 0.99 for f in r.json()["faces"] for m in f["matches"])
    # a group photo: one entry per face, largest first
    group = _search(base, (PHOTOS / "group1.jpg").read_bytes(), k=3).json()["faces"]
    assert len(group) == 3 and [f["face_index"] for f in group] == [0, 1, 2]


@pytest.mark.needs_data
def test_vector_face_and_thumbnail(server, celeba_gallery):
    base, _ = server
    gallery = Gallery.load(celeba_gallery[0])
    vector = gallery.embeddings()[7]
    r = httpx.post(f"{base}/v1/search/vector", json={"vectors": [vector.tolist()], "k": 3}, headers=AUTH)
    assert r.status_code == 200
    top = r.json()["results"][0][0]
    assert top["face_id"] == 7 and top["cosine"] == pytest.approx(1.0, abs=1e-5)
    meta = httpx.get(f"{base}/v1/faces/7", headers=AUTH).json()
    assert meta["face_id"] == 7 and meta["path"] == gallery.row(7)["path"]
    missing = httpx.get(f"{base}/v1/faces/999999", headers=AUTH)  # a NotFoundError, answered by the handler
    assert missing.status_code == 404 and missing.json() == {"detail": f"no face 999999 in this gallery of {len(gallery)}"}
    assert httpx.get(f"{base}/v1/faces/999999/thumbnail", headers=AUTH).json() == missing.json()
    thumb = httpx.get(f"{base}/v1/faces/7/thumbnail?size=96", headers=AUTH)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_COLOR).shape == (96, 96, 3)
    bad = httpx.post(f"{base}/v1/search/vector", json={"vectors": [[0.1] * 5], "k": 3}, headers=AUTH)
    assert bad.status_code == 422 and "128" in bad.text


@pytest.mark.needs_data
def test_limits_and_bad_uploads(server):
    base, _ = server
    data = (PHOTOS / "group1.jpg").read_bytes()
    for k in (0, 51, "x"):
        r = _search(base, data, k=k)
        assert r.status_code == 422, (k, r.text)
    assert "between 1 and 50" in _search(base, data, k=51).json()["detail"]
    big = _search(base, os.urandom(1_100_000))
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    many = io.BytesIO()
    Image.new("RGB", (2000, 1600), "white").save(many, "PNG")  # 3.2 Mpx, a small file
    r = _search(base, many.getvalue())
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    for junk in (b"", b"not an image at all", data[: len(data) // 3]):
        r = _search(base, junk)
        assert r.status_code == 422 and "cannot read the image" in r.json()["detail"], r.text
    missing = httpx.post(f"{base}/v1/search", data={"k": "3"}, headers=AUTH)
    assert missing.status_code == 422


@pytest.mark.needs_data
def test_twenty_concurrent_clients(server, celeba_gallery):
    base, log_path = server
    queries = [d for d, _ in _unseen_queries(celeba_gallery[0], n=10)]
    expected = [_search(base, d, k=4).json() for d in queries]
    jobs = [i % len(queries) for i in range(40)]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: (i, _search(base, queries[i], k=4)), jobs))
    for i, r in answers:
        assert r.status_code == 200
        got, want = r.json()["faces"], expected[i]["faces"]
        assert [[m["face_id"] for m in f["matches"]] for f in got] == [[m["face_id"] for m in f["matches"]] for f in want]
    # Structured logs, one JSON line per request, and no image content in them.
    text = log_path.read_bytes()
    assert b"\xff\xd8\xff" not in text and b"JFIF" not in text
    lines = [json.loads(line.split(" ", 3)[-1]) for line in text.decode().splitlines() if "facesearch.access" in line]
    assert len(lines) >= 40 and all({"method", "path", "status", "ms"} <= set(entry) for entry in lines)
