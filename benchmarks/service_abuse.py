"""Hostile requests to face-search serve: do well-behaved clients notice an abusive one?

Usage: python benchmarks/service_abuse.py [--gallery DIR] [--clients 50] [--seconds 60] [--concurrency N]

Starts ``face-search serve`` as a real uvicorn process on 127.0.0.1 (with a bearer token
and a fresh TMPDIR), over DIR or, without --gallery, over 300 CelebA test images indexed
into bench-out/service-abuse/gallery (once). Then two runs of SECONDS each:

1. CLIENTS well-behaved clients, each with its own connection, alternate image searches
   (real CelebA images, k = 8) and vector searches (one embedding, k = 8); a prober asks
   /healthz every 0.25 s;
2. the same while one abusive client (a separate process) sends, back to back:
   an unauthenticated 200 MB upload (declared Content-Length, streamed), a 265 MB JSON
   body (declared), a chunked JSON body that never ends (265 MB if nobody stops it) and
   a chunked 200 MB upload (both with the token).

Prints the well-behaved clients' requests, errors (must be 0), p50/p99 latency in both
runs and the p99 ratio (target <= 1.5), the slowest /healthz, the server's peak memory,
what the abusive client got, and the files left in the server's TMPDIR (must be none).
Loopback only; each run stops after SECONDS (requests in flight then finish).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))
TOKEN = "abuse-benchmark-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_gallery(out: Path) -> Path:
    """300 CelebA test images indexed with the default pipeline (skipped when already there)."""
    if (out / "gallery.json").is_file():
        return out
    from indexer import RunConfig, run_index

    config = RunConfig(dataset_root=str(SHARED / "celeba"), format="celeba", split="test", limit=300,
                       partition_size=100)
    run_index(config, out, workers=2, progress=False)
    return out


def start_server(gallery: Path, port: int, concurrency: int | None, tmpdir: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "FACESEARCH_API_TOKEN": TOKEN, "TMPDIR": str(tmpdir)}
    command = [sys.executable, "-m", "search.cli", "-q", "serve", "--gallery", str(gallery), "--port", str(port)]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the service exited:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the service was not ready in 300 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakRss(threading.Thread):
    """The highest VmRSS of a process, sampled every 0.1 s until stop()."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self._stop_event = pid, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except OSError:
                return
            self._stop_event.wait(0.1)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak_kb / 1024


async def well_behaved(base: str, clients: int, seconds: float, images: list[bytes], vectors: np.ndarray) -> dict:
    """CLIENTS clients, each on its own connection, for SECONDS; latencies of the requests they finished."""
    latencies: list[float] = []
    errors: Counter = Counter()
    health: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=120) as http:
            i = n
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    if i % 2 == 0:
                        r = await http.post("/v1/search", data={"k": "8"},
                                            files={"image": ("q.jpg", images[i % len(images)], "image/jpeg")})
                    else:
                        r = await http.post("/v1/search/vector", json={"vectors": [vectors[i % len(vectors)].tolist()],
                                                                       "k": 8})
                    if r.status_code != 200:
                        errors[f"HTTP {r.status_code}"] += 1
                except httpx.HTTPError as err:
                    errors[type(err).__name__] += 1
                latencies.append(time.perf_counter() - start)
                i += clients

    async def prober() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                await http.get("/healthz")
                health.append(time.perf_counter() - start)
                await asyncio.sleep(0.25)

    began = time.perf_counter()
    await asyncio.gather(prober(), *(client(n) for n in range(clients)))
    return {"latencies": np.array(latencies) * 1000, "errors": errors, "seconds": time.perf_counter() - began,
            "health_max_ms": 1000 * max(health) if health else float("nan")}


# --------------------------------------------------------------------------- the abusive client

MB = 2**20
PIECE = 2**20  # the abusive client writes its bodies 1 MB at a time, from one prepared buffer
_FRAME = b"%x\r\n" % 65536 + b"\x00" * 65536 + b"\r\n"  # one 64 KB chunk of a chunked body
_JSON = b"0.125," * (PIECE // 6)
_PART = (b"--abuse\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n"
         b"Content-Type: image/jpeg\r\n\r\n")


def _attack(host: str, port: int, path: str, token: str | None, content_type: str, first: bytes, piece: bytes,
            total: int, chunked: bool) -> tuple[str, int]:
    """One request whose body is ``first`` then ``piece`` repeated up to ``total`` bytes, written
    over a raw socket as fast as the server takes it: (the answer's status or the error, bytes written)."""
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Type: {content_type}"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    sent = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            sock.sendall(b"%x\r\n%s\r\n" % (len(first), first) if chunked else first)
            sent = len(first)
            view = memoryview(piece)
            while sent < total:
                part = view if chunked else view[: total - sent]  # a declared body is exactly ``total`` bytes
                sock.sendall(part)
                sent += len(part)
            sock.sendall(b"0\r\n\r\n" if chunked else b"")
        except OSError:
            pass  # the server closed the connection: its answer may still be there to read
        try:
            answer = sock.recv(4096)
        except OSError as err:
            return type(err).__name__, sent
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "no answer"
    return f"HTTP {status}", sent


def _chunked(payload: bytes) -> bytes:
    """``payload`` (a multiple of 64 KB) as the frames of a chunked body."""
    return b"".join(b"%x\r\n%s\r\n" % (65536, payload[i:i + 65536]) for i in range(0, len(payload), 65536))


#: name: (path, with the token, content type, first bytes, piece, total bytes, chunked)
ATTACKS = {
    "unauthenticated 200 MB upload, declared": (
        "/v1/search", False, "multipart/form-data; boundary=abuse", _PART, b"\x00" * PIECE, 200 * MB, False),
    "265 MB JSON, declared": (
        "/v1/search/vector", True, "application/json", b'{"k": 8, "vectors": [[', _JSON, 265 * MB, False),
    "265 MB JSON, chunked": (
        "/v1/search/vector", True, "application/json", b'{"k": 8, "vectors": [[', _chunked(b"0.125," * 174762
                                                                                          + b" " * 4), 265 * MB, True),
    "200 MB upload, chunked": (
        "/v1/search", True, "multipart/form-data; boundary=abuse", _PART, _FRAME * 16, 200 * MB, True),
}


def abuse(host: str, port: int, seconds: float, results) -> None:  # noqa: ANN001
    """Send the ATTACKS back to back, each on a new connection, for SECONDS."""
    deadline = time.perf_counter() + seconds
    outcome = {name: {"answers": Counter(), "sent": [], "ms": []} for name in ATTACKS}
    while time.perf_counter() < deadline:
        for name, (path, authenticated, content_type, first, piece, total, chunked) in ATTACKS.items():
            start = time.perf_counter()
            try:
                answer, sent = _attack(host, port, path, TOKEN if authenticated else None, content_type, first, piece,
                                       total, chunked)
            except OSError as err:
                answer, sent = type(err).__name__, 0
            outcome[name]["answers"][answer] += 1
            outcome[name]["ms"].append(1000 * (time.perf_counter() - start))
            outcome[name]["sent"].append(sent)
            if time.perf_counter() >= deadline:
                break
    results.put((outcome, time.process_time()))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", help="a gallery directory [default: 300 CelebA test images, indexed once]")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each of the two runs")
    parser.add_argument("--concurrency", type=int, default=None, help="the service's --concurrency [default: cores]")
    args = parser.parse_args()

    gallery = Path(args.gallery) if args.gallery else build_gallery(REPO / "bench-out" / "service-abuse" / "gallery")
    from search import Gallery

    g = Gallery.load(gallery)
    images = [p.read_bytes() for p in sorted((SHARED / "celeba" / "img_align_celeba").glob("*.jpg"))[::37][:100]]
    vectors = g.embeddings()[:: max(1, len(g) // 100)][:100]
    port = _port()
    base = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="service-abuse-"))
    server_tmp = work / "server-tmp"
    server_tmp.mkdir()
    proc = start_server(gallery, port, args.concurrency, server_tmp, work / "server.log")
    rows = []
    try:
        asyncio.run(well_behaved(base, 4, 3, images, vectors))  # warm the connections and caches
        for label, hostile in (("without the abusive client", False), ("with the abusive client", True)):
            rss = PeakRss(proc.pid)
            rss.start()
            load_before, cpu_before = os.getloadavg()[0], cpu_seconds(proc.pid)
            spawn = multiprocessing.get_context("spawn")  # a fresh process: not a fork of this one's threads
            queue = spawn.Queue()
            attacker = None
            if hostile:
                attacker = spawn.Process(target=abuse, args=("127.0.0.1", port, args.seconds, queue))
                attacker.start()
            load = asyncio.run(well_behaved(base, args.clients, args.seconds, images, vectors))
            outcome = None
            if attacker is not None:
                outcome = queue.get(timeout=120)  # (what each attack got, the abusive client's CPU seconds)
                attacker.join(timeout=60)
            rows.append((label, load, rss.stop(), outcome, cpu_seconds(proc.pid) - cpu_before, load_before))
            time.sleep(2)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    left = sorted(p.name for p in server_tmp.rglob("*"))

    print(f"gallery: {len(g):,} faces; {args.clients} well-behaved clients (image and vector searches, k = 8), "
          f"{args.seconds:.0f} s per run; service concurrency {args.concurrency or os.cpu_count()}; "
          f"{os.cpu_count()} cores\n")
    print("| run | requests | errors | requests/s | p50 ms | p99 ms | slowest /healthz ms | server peak RSS MB "
          "| server CPU s | load average before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, load, peak, _, server_cpu, load_average in rows:
        ms = load["latencies"]
        errors = sum(load["errors"].values())
        detail = f" ({', '.join(f'{k}: {v}' for k, v in load['errors'].items())})" if errors else ""
        print(f"| {label} | {len(ms)} | {errors}{detail} | {len(ms) / load['seconds']:.1f} | "
              f"{np.percentile(ms, 50):.0f} | {np.percentile(ms, 99):.0f} | {load['health_max_ms']:.0f} | {peak:.0f} | "
              f"{server_cpu:.0f} | {load_average:.1f} |")
    ratio = np.percentile(rows[1][1]["latencies"], 99) / np.percentile(rows[0][1]["latencies"], 99)
    print(f"\np99 with / without the abusive client: {ratio:.2f}x (target <= 1.5x)\n")
    print("| abusive request | sent | answers | client sent per try, median MB | ms per try, median |")
    print("|---|---|---|---|---|")
    outcome, attacker_cpu = rows[1][3]
    for name, result in outcome.items():
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(result["answers"].items()))
        print(f"| {name} | {len(result['ms'])} | {answers} | {np.median(result['sent']) / 2**20:.1f} | "
              f"{np.median(result['ms']):.0f} |")
    print(f"\nthe abusive client's own CPU: {attacker_cpu:.1f} s in {args.seconds:.0f} s "
          f"({100 * attacker_cpu / args.seconds / (os.cpu_count() or 1):.0f}% of the machine)")
    print(f"files left in the server's TMPDIR: {len(left)}{' ' + ', '.join(left[:5]) if left else ''}; "
          f"service still up after both runs: {'yes' if alive else 'NO'}")


if __name__ == "__main__":
    main()
