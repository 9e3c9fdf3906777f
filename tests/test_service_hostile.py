"""Hostile requests to the HTTP service: the token and the size limits come before the body is
read, uploads stay in memory, big allowed bodies do not stall other clients, bad numbers are
named, and /readyz means every model is loaded. Against a real uvicorn process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from search import Gallery
from tests.conftest import CELEBA, REPO
from tests.test_service import _free_port

TOKEN = "hostile-token-789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 2**20
LIMIT_MB = 4  # --max-upload-mb and --max-json-mb of the server under test


@dataclass
class Server:
    base: str
    port: int
    proc: subprocess.Popen
    tmpdir: Path  # the server's TMPDIR
    log: Path
    ready: dict  # /readyz when it first answered 200
    first_search_s: float  # the first image search after that
    second_search_s: float


def _image_search(base: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{base}/v1/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "3"},
                      headers=AUTH, timeout=60)


@pytest.fixture(scope="module")
def server(celeba_gallery, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    tmpdir = work / "server-tmp"
    tmpdir.mkdir()
    port = _free_port()
    log_path = work / "server.log"
    env = {**os.environ, "FACESEARCH_API_TOKEN": TOKEN, "TMPDIR": str(tmpdir)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.cli", "serve", "--gallery", str(celeba_gallery[0]), "--port", str(port),
             "--max-upload-mb", str(LIMIT_MB), "--max-json-mb", str(LIMIT_MB), "--concurrency", "2"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            ready = httpx.get(f"{base}/readyz", timeout=2)
            if ready.status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"service not ready in 180 s:\n{log_path.read_text()}")
    face = (CELEBA / "img_align_celeba" / "182638.jpg").read_bytes()
    timings = []
    for _ in range(2):  # the first search right after /readyz turned 200, then another
        start = time.perf_counter()
        assert _image_search(base, face).status_code == 200
        timings.append(time.perf_counter() - start)
    try:
        yield Server(base, port, proc, tmpdir, log_path, ready.json(), *timings)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _temp_files(server: Server) -> list[str]:
    """Files the server holds open under its TMPDIR (an unnamed O_TMPFILE too), and files left there."""
    held = []
    for fd in Path(f"/proc/{server.proc.pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(server.tmpdir)):
            held.append(target)
    return held + [str(p) for p in server.tmpdir.rglob("*")]


def _raw_post(server: Server, path: str, headers: dict[str, str], pieces, pause_after: int | None = None,
              during_pause=None) -> tuple[int, str, int, float]:  # noqa: ANN001
    """POST over a raw socket, writing ``pieces`` as fast as the server takes them (optionally
    pausing after ``pause_after`` bytes to call ``during_pause``). Returns (status, response
    head, bytes written, seconds)."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    written = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        try:
            sock.sendall(head.encode())
            for piece in pieces:
                sock.sendall(piece)
                written += len(piece)
                if pause_after is not None and written >= pause_after:
                    pause_after = None
                    during_pause()
        except OSError:
            pass  # the server closed the connection; its answer is there to read
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    seconds = time.perf_counter() - start
    status_line, _, rest = answer.decode("latin-1").partition("\r\n")
    return int(status_line.split()[1]), rest.lower(), written, seconds


def _zeros(total: int, piece: int = MB):  # noqa: ANN202
    left = total
    while left > 0:
        yield b"\x00" * min(piece, left)
        left -= piece


def _chunked(pieces):  # noqa: ANN001, ANN202
    for piece in pieces:
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


PART = (b"--b0undary\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
        b"Content-Type: image/jpeg\r\n\r\n")
MULTIPART = {"Content-Type": "multipart/form-data; boundary=b0undary"}


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, _rss_mb(self.pid))
            self.done.wait(0.02)

    def __enter__(self) -> "PeakRss":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


@pytest.mark.needs_data
@pytest.mark.parametrize(("name", "path", "headers", "status"), [
    ("unauthenticated 200 MB upload", "/v1/search", {**MULTIPART, "Content-Length": str(200 * MB)}, 401),
    ("265 MB JSON", "/v1/search/vector", {**AUTH, "Content-Type": "application/json",
                                          "Content-Length": str(265 * MB)}, 413),
    ("200 MB upload", "/v1/search", {**AUTH, **MULTIPART, "Content-Length": str(200 * MB)}, 413),
    ("unauthenticated 200 MB enrolment", "/v1/faces", {**MULTIPART, "Content-Length": str(200 * MB)}, 401),
])
def test_declared_bodies_are_refused_before_they_are_read(server, name, path, headers, status):
    before = _rss_mb(server.proc.pid)
    with PeakRss(server.proc.pid) as rss:
        got, head, written, seconds = _raw_post(server, path, headers, [PART, *_zeros(200 * MB)])
    assert got == status, name
    assert "connection: close" in head  # the server stops reading the connection
    assert written < 40 * MB, f"{name}: the client wrote {written / MB:.0f} MB before the answer"
    assert seconds < 5
    assert rss.peak - before < 64, f"{name}: memory rose by {rss.peak - before:.0f} MB"
    assert _temp_files(server) == []
    assert httpx.get(f"{server.base}/healthz", timeout=5).status_code == 200


@pytest.mark.needs_data
@pytest.mark.parametrize(("name", "path", "headers", "first"), [
    ("endless JSON", "/v1/search/vector", {"Content-Type": "application/json"}, b'{"k": 3, "vectors": [['),
    ("endless upload", "/v1/search", MULTIPART, PART),
])
def test_chunked_bodies_stop_at_the_limit(server, name, path, headers, first):
    before = _rss_mb(server.proc.pid)
    filler = b"0.5," * (MB // 4) if b"vectors" in first else b"\x00" * MB
    pieces = _chunked([first, *(filler for _ in range(265))])
    with PeakRss(server.proc.pid) as rss:
        got, head, written, seconds = _raw_post(server, path, {**AUTH, **headers, "Transfer-Encoding": "chunked"},
                                                pieces)
    assert got == 413 and "connection: close" in head, name
    assert written < (LIMIT_MB + 40) * MB, f"{name}: the client wrote {written / MB:.0f} MB before the answer"
    assert seconds < 10
    assert rss.peak - before < 100, f"{name}: memory rose by {rss.peak - before:.0f} MB"
    assert _temp_files(server) == []


@pytest.mark.needs_data
def test_uploads_stay_in_memory(server):
    """A 3 MB photo (under the 4 MB limit, over Starlette's 1 MB spool) never touches the disk:
    half-way through the upload the server holds no file under its TMPDIR."""
    noise = np.random.default_rng(1).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(noise).save(png, "PNG", compress_level=0)
    photo = png.getvalue()
    assert 2.5 * MB < len(photo) < LIMIT_MB * MB
    body = PART + photo + b"\r\n--b0undary\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n3\r\n--b0undary--\r\n"
    seen: list[list[str]] = []

    def look() -> None:
        time.sleep(0.5)  # let the server take in what was written so far
        seen.append(_temp_files(server))

    pieces = [body[i:i + 256 * 1024] for i in range(0, len(body), 256 * 1024)]
    got, _, written, _ = _raw_post(server, "/v1/search", {**AUTH, **MULTIPART, "Content-Length": str(len(body))},
                                   pieces, pause_after=int(2.2 * MB), during_pause=look)
    assert got == 200 and written == len(body)
    assert seen == [[]], f"the upload was spooled to disk: {seen}"
    assert _temp_files(server) == []


@pytest.mark.needs_data
def test_a_big_allowed_body_does_not_stall_others(server, celeba_gallery):
    """1000 vectors (2.5 MB of JSON, under the 4 MB limit) are answered while /healthz stays quick."""
    gallery = Gallery.load(celeba_gallery[0])
    vectors = np.repeat(gallery.embeddings(), 4, axis=0)[:1000]
    body = json.dumps({"vectors": vectors.tolist(), "k": 5}).encode()
    assert 2 * MB < len(body) < LIMIT_MB * MB
    answers: list[httpx.Response] = []

    def post() -> None:
        for _ in range(4):
            answers.append(httpx.post(f"{server.base}/v1/search/vector", content=body,
                                      headers={**AUTH, "Content-Type": "application/json"}, timeout=60))

    worker = threading.Thread(target=post)
    worker.start()
    health = []
    with httpx.Client(timeout=30) as http:
        while worker.is_alive():
            start = time.perf_counter()
            http.get(f"{server.base}/healthz")
            health.append(time.perf_counter() - start)
            time.sleep(0.01)
    worker.join()
    assert [r.status_code for r in answers] == [200] * 4
    results = answers[0].json()["results"]
    assert len(results) == 1000 and [m["face_id"] for m in results[0]][0] == int(gallery.face_ids[0])
    assert max(health) < 0.5, f"/healthz took up to {max(health):.2f} s while big queries were answered"


def test_a_large_vector_query_is_parsed_in_short_calls():
    """json's and pydantic's C parsers hold the GIL for a whole document: parsing 10 MB in one call
    from a worker thread stalls the event loop as long as the parse. In pieces, it does not."""
    from search.service import parse_vector_query, vector_query_model

    data = np.random.default_rng(0).normal(size=(1000, 512))
    body = json.dumps({"vectors": data.tolist(), "k": 8, "threshold": 0.5}).encode()
    query, vectors = parse_vector_query(body)
    assert query.k == 8 and query.threshold == 0.5 and np.array_equal(vectors, data)

    async def longest_gap(fn) -> tuple[float, float]:  # noqa: ANN001
        gaps: list[float] = []

        async def tick() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        await asyncio.to_thread(fn, body)
        took = time.perf_counter() - start
        ticker.cancel()
        return max(gaps), took

    best = min((asyncio.run(longest_gap(parse_vector_query)) for _ in range(3)), key=lambda r: r[0])
    whole = max((asyncio.run(longest_gap(vector_query_model().model_validate_json)) for _ in range(3)),
                key=lambda r: r[0])
    assert whole[0] > 0.6 * whole[1], "one call was expected to stall the loop (the premise of this test)"
    assert best[0] < 0.5 * whole[0], f"longest stall {best[0] * 1000:.0f} ms in pieces, {whole[0] * 1000:.0f} ms whole"


def test_large_vector_query_errors_name_the_field():
    from fastapi import HTTPException

    from search.service import INLINE_JSON_BYTES, parse_vector_query

    rows = np.random.default_rng(2).normal(size=(60, 512)).tolist()
    pad = " " * INLINE_JSON_BYTES  # the large-body path

    def detail(body: str) -> str:
        with pytest.raises(HTTPException) as caught:
            parse_vector_query((body + pad).encode())
        assert caught.value.status_code == 422
        return caught.value.detail

    assert detail(json.dumps({"vectors": rows[:40] + [[True] * 512]})) == "vectors[40][0]: Input should be a valid number"
    assert detail(json.dumps({"vectors": rows[:45] + [rows[0][:7]]})) == "vectors[45] has length 7, vectors[0] has length 512"
    assert detail(json.dumps({"vectors": rows[:33] + [5] + rows})) == "vectors[33]: Input should be a valid list"
    assert detail(json.dumps({"vectors": rows, "k": True})) == "k: Input should be a valid integer"
    assert detail(json.dumps({"k": 3, "pad": "x"})) == "vectors: Field required"
    assert detail('{"vectors": [[1, NaN]]}') == "vectors[0][1]: Input should be a finite number"
    assert detail('{"vectors": [[1, 2]]} trailing').startswith("body: Invalid JSON: Extra data")


@pytest.mark.needs_data
def test_bad_numbers_are_refused_naming_the_field(server, celeba_gallery):
    vector = Gallery.load(celeba_gallery[0]).embeddings()[3].tolist()
    data = (CELEBA / "img_align_celeba" / "182638.jpg").read_bytes()
    cases = [
        ({"vectors": [vector], "k": True}, "k: Input should be a valid integer"),
        ({"vectors": [vector], "k": 2.0}, "k: Input should be a valid integer"),
        ({"vectors": [vector], "threshold": True}, "threshold"),
        ({"vectors": [vector, [0.0] * 128], "k": 3}, "vectors[1] is all zeros"),
        ({"vectors": [vector, vector[:100]], "k": 3}, "vectors[1] has length 100"),
        ({"vectors": [vector[:5]], "k": 3}, "128"),
        ({"vectors": [vector[:127] + ["0.1"]], "k": 3}, "vectors[0][127]: Input should be a valid number"),
        ({"vectors": [vector[:127] + [True]], "k": 3}, "vectors[0][127]: Input should be a valid number"),
    ]
    for body, expected in cases:
        r = httpx.post(f"{server.base}/v1/search/vector", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 422 and expected in r.json()["detail"], (body.get("k"), r.text)
    for raw, expected in [('{"vectors": [[%s]], "threshold": NaN}', "threshold must be a finite number"),
                          ('{"vectors": [[%s]], "threshold": Infinity}', "threshold must be a finite number"),
                          ('{"vectors": [[%s]], "threshold": 1.5}', "threshold must be a finite number between -1 and 1"),
                          ('{"vectors": [[%s]], "k": 3, "x": NaN}', None)]:
        r = httpx.post(f"{server.base}/v1/search/vector", content=raw % ",".join(map(str, vector)),
                       headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
        if expected is None:
            assert r.status_code == 200  # an unknown member is ignored
        else:
            assert r.status_code == 422 and expected in r.json()["detail"], r.text
    for form, expected in [({"threshold": "nan"}, "threshold must be a finite number"),
                           ({"threshold": "inf"}, "threshold must be a finite number"),
                           ({"threshold": "-inf"}, "threshold must be a finite number"),
                           ({"k": "true"}, "k: Input should be a valid integer"),
                           ({"k": "1e3"}, "k: Input should be a valid integer")]:
        r = httpx.post(f"{server.base}/v1/search", files={"image": ("q.jpg", data, "image/jpeg")}, data=form,
                       headers=AUTH, timeout=30)
        assert r.status_code == 422 and expected in r.json()["detail"], (form, r.text)
    missing = httpx.post(f"{server.base}/v1/search", data={"k": "3"}, headers=AUTH, timeout=30)
    assert missing.status_code == 422 and missing.json()["detail"] == "image: Field required"


@pytest.mark.needs_data
def test_ready_means_every_model_is_loaded(server):
    assert set(server.ready["warm"]) == {"detector", "landmarks", "embedder"}
    assert server.ready["threads"] == 2
    assert server.first_search_s < 2 * server.second_search_s + 0.5, (
        f"first search {server.first_search_s:.2f} s, second {server.second_search_s:.2f} s")
    ready_lines = [json.loads(line.split(" ", 3)[-1]) for line in server.log.read_text().splitlines()
                   if '"event": "ready"' in line]
    assert len(ready_lines) == 1 and set(ready_lines[0]["warm"]) == {"detector", "landmarks", "embedder"}


def test_warm_up_loads_every_stage(pipeline):
    timings = pipeline.warm_up()
    assert set(timings) == {"detector", "landmarks", "embedder"}
    start = time.perf_counter()
    again = pipeline.warm_up()  # everything loaded: only the runs on blank input are left
    assert time.perf_counter() - start < 2.0 and set(again) == set(timings)


@pytest.mark.needs_data
def test_search_vectors_refuses_vectors_without_a_direction(celeba_gallery):
    from facesearch.errors import ConfigurationError
    from search.searcher import Searcher

    searcher = Searcher(celeba_gallery[0])
    embedding = searcher.gallery.embeddings()[5].astype(np.float64)
    with pytest.raises(ConfigurationError, match=r"vectors\[1\] is all zeros"):
        searcher.search_vectors([embedding, np.zeros(128)], k=3)
    with pytest.raises(ConfigurationError, match=r"vectors\[0\] contains NaN"):
        searcher.search_vectors([np.full(128, np.nan)], k=3)
    with pytest.raises(ConfigurationError, match=r"vectors\[1\] has length 3"):
        searcher.search_vectors([list(embedding), [1.0, 2.0, 3.0]], k=3)
    # tiny or huge but finite numbers keep their direction (no underflow or overflow to zero)
    for scale in (1e-30, 1e30):
        top = searcher.search_vectors([embedding * scale], k=1)[0][0]
        assert top.face_id == int(searcher.gallery.face_ids[5]) and top.cosine == pytest.approx(1.0, abs=1e-5)
