"""Requests/s and p50/p99 latency of face-search serve under 20 concurrent clients, on loopback.

Usage: python benchmarks/service.py --gallery bench-out/eval/celeba [--clients 20] [--requests 400]
                                    [--concurrency 2]

Starts the service as a real uvicorn process on 127.0.0.1, then an asyncio load
generator (httpx) keeps CLIENTS requests in flight: image searches with real
CelebA images (the whole pipeline: decode, detect, align, embed, FAISS), then
vector searches (FAISS and JSON only). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(base: str, make_request, clients: int, total: int) -> tuple[list[float], float, int]:  # noqa: ANN001
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            r = await make_request(http, i)
            latencies.append(time.perf_counter() - start)
            errors += r.status_code != 200

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        await make_request(http, 0)  # warm
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, time.perf_counter() - start, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from search import Gallery

    gallery = Gallery.load(args.gallery)
    images = sorted((SHARED / "celeba" / "img_align_celeba").glob("*.jpg"))[:: 37][:100]
    payloads = [p.read_bytes() for p in images]
    vectors = gallery.embeddings()[:: max(1, len(gallery) // 100)][:100]
    port = _port()
    env = {**os.environ, "FACESEARCH_API_TOKEN": ""}
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "-q", "serve", "--gallery", args.gallery,
                             "--port", str(port), "--concurrency", str(args.concurrency)], cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        rows = []

        async def image_search(http, i):  # noqa: ANN001, ANN202
            return await http.post("/v1/search", files={"image": ("q.jpg", payloads[i % len(payloads)], "image/jpeg")},
                                   data={"k": "8"})

        async def vector_search(http, i):  # noqa: ANN001, ANN202
            return await http.post("/v1/search/vector", json={"vectors": [vectors[i % len(vectors)].tolist()], "k": 8})

        for name, fn, total in (("image search (/v1/search)", image_search, args.requests),
                                ("vector search (/v1/search/vector)", vector_search, args.requests * 5)):
            latencies, seconds, errors = asyncio.run(_load(base, fn, args.clients, total))
            ms = np.array(latencies) * 1000
            rows.append((name, total, errors, total / seconds, np.percentile(ms, 50), np.percentile(ms, 99)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"gallery: {len(gallery):,} faces ({gallery.dim}-D, {gallery.info.index_type} index); "
          f"{args.clients} concurrent clients; service concurrency {args.concurrency}; {os.cpu_count()} cores\n")
    print("| endpoint | requests | errors | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for name, total, errors, rps, p50, p99 in rows:
        print(f"| {name} | {total} | {errors} | {rps:.1f} | {p50:.0f} | {p99:.0f} |")


if __name__ == "__main__":
    main()
