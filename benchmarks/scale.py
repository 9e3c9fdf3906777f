"""Search at scale (issue 13): galleries of 200k, 1M and 10M faces, default settings.

The vectors are synthetic but shaped like the real ones: identity centres drawn from a
Gaussian fitted to the centres of real default-pipeline embeddings (LFW), faces drawn
around them with the real within-identity covariance, L2-normalised, about 20 faces an
identity (CelebA has 20). Each gallery is written in the project's own format
(manifest parts + run.json), then built with ``face-index build`` defaults
(``--index auto``), each step in a child process so its peak memory is its own.

Per size it reports: the index chosen, build time and peak memory, index and gallery
bytes, open time and resident memory after opening, single-query p50/p99 through
``Searcher.search_vectors``, the same queries on the raw index (the reference) and the
ratio, batch throughput, and recall@8 against exact search for 800 fresh synthetic and
200 real queries. For the smallest size it also serves the gallery over HTTP and times
/v1/search/vector with 1 and 20 concurrent clients.

    python benchmarks/scale.py --real bench-out/scale/real-lfw.npz --sizes 200000 1000000 10000000

``--real``: an .npz with ``embeddings`` (N, 128) and ``identities`` of a real gallery
(see ``--export-real GALLERY`` to make one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PART_ROWS = 100_000
FACES_PER_IDENTITY = 20


def export_real(gallery: str, out: Path) -> None:
    from search.gallery import Gallery

    g = Gallery.load(gallery)
    identities = np.array([str(x) for x in g.read_columns(["identity"]).column("identity").to_pylist()])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, embeddings=g.embeddings(), identities=identities)


class Model:
    """Centres ~ N(mu, B), faces ~ centre + N(0, W), fitted on real embeddings."""

    def __init__(self, real: Path) -> None:
        data = np.load(real)
        x, labels = data["embeddings"].astype(np.float64), data["identities"]
        names, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        centres = np.zeros((len(names), x.shape[1]))
        np.add.at(centres, inverse, x)
        centres /= counts[:, None]
        keep = counts[inverse] >= 2
        within = x[keep] - centres[inverse[keep]]
        self.dim = x.shape[1]
        self.mu = centres.mean(axis=0)
        self.between = np.linalg.cholesky(np.cov(centres.T) + 1e-9 * np.eye(self.dim))
        self.within = np.linalg.cholesky(np.cov(within.T) + 1e-9 * np.eye(self.dim))
        self.real = x.astype(np.float32)

    def faces(self, rng: np.random.Generator, n: int, first_identity: int) -> tuple[np.ndarray, np.ndarray]:
        people = max(1, n // FACES_PER_IDENTITY)
        centres = self.mu + rng.standard_normal((people, self.dim)) @ self.between.T
        who = rng.integers(0, people, n)
        v = centres[who] + rng.standard_normal((n, self.dim)) @ self.within.T
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v.astype(np.float32), who + first_identity


def write_gallery(model: Model, n: int, out: Path, seed: int) -> None:
    """A gallery directory in the project's format, before its first build."""
    import pyarrow as pa

    from indexer.config import RunConfig
    from indexer.layout import FAILURE_SCHEMA, GalleryLayout, fixed_list, manifest_schema, write_json_atomic, write_table_atomic

    layout = GalleryLayout(out)
    config = RunConfig(dataset_root=str(out / "dataset"), format="folders", partition_size=PART_ROWS)
    write_json_atomic(layout.run_file, config.to_dict())
    real_pipeline = REPO / "bench-out" / "scale" / "pipeline.json"
    if real_pipeline.is_file():
        (out / "pipeline.json").write_text(real_pipeline.read_text())
    rng = np.random.default_rng(seed)
    schema = manifest_schema(model.dim)
    for part, start in enumerate(range(0, n, PART_ROWS)):
        m = min(PART_ROWS, n - start)
        vectors, who = model.faces(rng, m, first_identity=part * (PART_ROWS // FACES_PER_IDENTITY + 1))
        names = [f"p{w:07d}" for w in who]
        table = pa.Table.from_pydict({
            "face_id": pa.array(np.arange(start, start + m, dtype=np.int64)),
            "path": pa.array([f"{name}/{start + i:08d}.jpg" for i, name in enumerate(names)], pa.string()),
            "identity": pa.array(names, pa.string()),
            "split": pa.nulls(m, pa.string()),
            "face_index": pa.array(np.zeros(m, np.int32)),
            "box": fixed_list(np.zeros((m, 4), np.float32), 4),
            "score": pa.array(np.ones(m, np.float32)),
            "landmarks": fixed_list(np.zeros((m, 10), np.float32), 10),
            "embedding": fixed_list(vectors, model.dim),
            "width": pa.array(np.full(m, 178, np.int32)),
            "height": pa.array(np.full(m, 218, np.int32)),
            "content_hash": pa.nulls(m, pa.string()),
        }, schema=schema)
        name = f"part-{part:05d}"
        write_table_atomic(pa.Table.from_pylist([], schema=FAILURE_SCHEMA), layout.partition_file("failures", name))
        write_table_atomic(table, layout.partition_file("manifest", name))


def child(code: str) -> dict:
    """Run ``code`` in a fresh Python; it prints one JSON line last. Adds the child's peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_mb"] = round(max(peak, before) / 1024, 1)  # ru_maxrss of the largest child so far
    return result


BUILD = """
import json, time, resource
from indexer.build import build_gallery
t = time.perf_counter()
info = build_gallery({dir!r})
print(json.dumps({{"build_s": round(time.perf_counter() - t, 1), "index": dict(info.index),
                  "self_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}))
"""

MEASURE = """
import json, os, time, resource
import numpy as np
t = time.perf_counter()
from search.gallery import Gallery
from search.searcher import Searcher
from indexer import ann
import_s = time.perf_counter() - t
t = time.perf_counter()
g = Gallery.load({dir!r})
open_s = time.perf_counter() - t
s = Searcher(g)
def status():
    fields = {{}}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields
after_open = status()
q = np.load({queries!r})
single, raw = [], []
for i in range(len(q)):
    t0 = time.perf_counter(); s.search_vectors(q[i:i + 1], k=8); single.append(time.perf_counter() - t0)
for i in range(len(q)):
    t0 = time.perf_counter()
    ann.search(g.index, g.search_settings, q[i:i + 1], 8, g.store, g.positions, threads=1)
    raw.append(time.perf_counter() - t0)
t0 = time.perf_counter(); s.search_vectors(q, k=8); batch_s = time.perf_counter() - t0
_, found = ann.search(g.index, g.search_settings, q, 8, g.store, g.positions, threads=os.cpu_count())
truth = ann.ExactTopK(q, 8)
import pyarrow.parquet as pq
from indexer.layout import embeddings_of
for part in g.layout.manifest_files(g.info):
    tab = pq.read_table(part, columns=["face_id", "embedding"])
    truth.update(tab.column("face_id").to_numpy().astype(np.int64), embeddings_of(tab))
synthetic, real = found[:-{real}], found[-{real}:]
ms = lambda xs, p: round(float(np.percentile(xs, p)) * 1000, 3)
files = [os.path.join(dp, f) for dp, _, fs in os.walk({dir!r}) for f in fs]
print(json.dumps({{
    "faces": len(g), "open_s": round(open_s, 2), "import_s": round(import_s, 2), "rss_after_open_mb": after_open,
    "rss_after_queries_mb": status(),
    "p50_ms": ms(single, 50), "p99_ms": ms(single, 99), "raw_p50_ms": ms(raw, 50), "raw_p99_ms": ms(raw, 99),
    "batch_qps": round(len(q) / batch_s, 1),
    "recall_synthetic": round(ann.recall_at_k(synthetic, truth.ids[:-{real}]), 4),
    "recall_real": round(ann.recall_at_k(real, truth.ids[-{real}:]), 4),
    "index_bytes": os.path.getsize(g.layout.index_path(g.info)),
    "gallery_bytes": sum(os.path.getsize(f) for f in files),
}}))
"""


def http(gallery: Path, queries: np.ndarray, seconds: float = 20.0) -> dict:
    import socket
    import threading

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FACESEARCH_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "-q", "serve", "--gallery", str(gallery), "--port",
                             str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        out = {}
        for clients in (1, 20):
            latencies: list[float] = []
            errors = [0]
            stop = time.time() + seconds

            def run(seed: int) -> None:
                with httpx.Client(timeout=30) as client:
                    i = seed
                    while time.time() < stop:
                        body = {"vectors": [queries[i % len(queries)].tolist()], "k": 8}
                        t0 = time.perf_counter()
                        r = client.post(f"{base}/v1/search/vector", json=body)
                        latencies.append(time.perf_counter() - t0)
                        errors[0] += r.status_code != 200
                        i += clients

            threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[f"{clients}_clients"] = {"requests": len(latencies), "errors": errors[0],
                                         "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
                                         "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1),
                                         "per_s": round(len(latencies) / seconds, 1)}
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=REPO / "bench-out" / "scale" / "real-lfw.npz")
    parser.add_argument("--export-real", metavar="GALLERY", help="Write --real from a real gallery, then stop.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000, 10_000_000])
    parser.add_argument("--work", type=Path, default=REPO / "bench-out" / "scale")
    parser.add_argument("--http-seconds", type=float, default=20.0)
    parser.add_argument("--keep", action="store_true", help="Keep the galleries (they are large).")
    args = parser.parse_args()
    if args.export_real:
        export_real(args.export_real, args.real)
        return
    model = Model(args.real)
    rng = np.random.default_rng(11)
    fresh, _ = model.faces(rng, 800, first_identity=10**9)
    real = model.real[rng.choice(len(model.real), 200, replace=False)]
    queries = np.concatenate([fresh, real]).astype(np.float32)
    args.work.mkdir(parents=True, exist_ok=True)
    np.save(args.work / "queries.npy", queries)
    results = []
    for n in args.sizes:
        out = args.work / f"g{n}"
        if not (out / "gallery.json").exists():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            write_gallery(model, n, out, seed=n)
            print(f"[{n}] wrote the manifest in {time.perf_counter() - t:.0f} s", flush=True)
            built = child(BUILD.format(dir=str(out)))
        else:
            built = {"build_s": None, "index": json.loads((out / "gallery.json").read_text())["index"]}
        print(f"[{n}] built: {json.dumps(built)}", flush=True)
        measured = child(MEASURE.format(dir=str(out), queries=str(args.work / "queries.npy"), real=len(real)))
        print(f"[{n}] measured: {json.dumps(measured)}", flush=True)
        row = {"n": n, **built, **measured}
        if n == min(args.sizes):
            row["http"] = http(out, queries, args.http_seconds)
            print(f"[{n}] http: {json.dumps(row['http'])}", flush=True)
        results.append(row)
        (args.work / "scale.json").write_text(json.dumps(results, indent=2))
        if not args.keep and n >= 1_000_000:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
    print(table(results))


def table(results: list[dict]) -> str:
    lines = ["| faces | index (tuned) | build s | build peak MB | index MB | gallery MB | open s | RSS after open MB (anon) "
             "| p50 / p99 ms | raw faiss p50 ms | ratio | batch q/s | recall@8 synthetic / real |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        index = r["index"]
        settings = ", ".join(f"{k} {index[k]}" for k in ("efSearch", "nprobe", "rerank") if k in index)
        rss = r["rss_after_open_mb"]
        lines.append(
            f"| {r['n']:,} | {index['type']} ({settings or 'exact'}) | {r['build_s']} | {r.get('self_peak_mb', '-')} "
            f"| {r['index_bytes'] / 2**20:.0f} | {r['gallery_bytes'] / 2**20:.0f} | {r['open_s']} "
            f"| {rss.get('VmRSS')} ({rss.get('RssAnon')}) | {r['p50_ms']} / {r['p99_ms']} | {r['raw_p50_ms']} "
            f"| {r['p50_ms'] / max(r['raw_p50_ms'], 1e-9):.2f} | {r['batch_qps']} "
            f"| {r['recall_synthetic']} / {r['recall_real']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
