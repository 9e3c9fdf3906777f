"""The Ray engine against the local engine: the same images, side by side, on this machine.

Usage: python benchmarks/ray_engine.py [--limit 2000] [--partition-size 100 1000] [--workers 2]
           [--repeat 1] [--out bench-out/ray_engine.json]

Each run is the real command, ``face-index run DATASET --format celeba --split test --limit N``,
in a fresh process: ``--workers W`` (the local engine), then ``--engine ray --ray-address local``
(the driver starts a one-node Ray instance with one CPU per core, as a head node would) for each
partition size. Per run:

- images/s: the indexer's own rate from the start of mapping (worker start-up and model loading
  included) to the last partition written; "after start-up" from the first result (for Ray:
  the first partition computed); "wall": the whole command (listing, Ray start, FAISS build).
- Ray start-up: ``ray.init`` starting the local instance (GCS, raylet, object store).
- Peak memory: the process tree sampled every 100 ms by RSS: the driver; the workers (the local
  pool's processes, or Ray's ``ray::`` worker processes); Ray's own processes (GCS server,
  raylet, agents). Each is the peak of the group's sum. RSS counts pages shared between
  processes (torch's libraries, the object store's shared memory) once per process.
- load before: the 1-minute load average when the run started (the machine is shared).
- Same output: every manifest and failure part of the Ray run equals the local run's byte for
  byte (for the same partition size; the local run is repeated per size when they differ).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))
RATE = re.compile(r"processed (\d+) images in ([\d.]+) s \(([\d.]+) images/s(?:, ([\d.]+) images/s after start-up)?\)")
RAY_READY = re.compile(r"Ray ready in ([\d.]+) s")


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                out.extend(int(c) for c in handle.read().split())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


class MemorySampler(threading.Thread):
    """Peak RSS sums of a command's driver, its workers and Ray's own processes."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"driver": 0, "workers": 0, "ray_system": 0, "total": 0, "worker_max": 0, "worker_count": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            groups = {"driver": _rss(self.pid), "workers": 0, "ray_system": 0}
            worker_max = count = 0
            stack = _children(self.pid)
            while stack:
                pid = stack.pop()
                stack.extend(_children(pid))
                rss, title = _rss(pid), _title(pid)
                if title.startswith("ray::") or "default_worker.py" in title or "multiprocessing" in title:
                    groups["workers"] += rss
                    worker_max = max(worker_max, rss)
                    count += 1
                else:
                    groups["ray_system"] += rss
            groups["total"] = sum(groups.values())
            for key, value in (*groups.items(), ("worker_max", worker_max), ("worker_count", count)):
                self.peak[key] = max(self.peak[key], value)
            self.stop.wait(self.interval)


def run_once(args: argparse.Namespace, engine: list[str], partition_size: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "indexer.cli", "run", str(SHARED / "celeba"), "--format", "celeba", "--split", "test",
           "--limit", str(args.limit), "--partition-size", str(partition_size), "--no-progress", "--out", str(out),
           *engine]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    sampler = MemorySampler(proc.pid)
    sampler.start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    rate = RATE.search(stderr)
    ready = RAY_READY.search(stderr)
    return {
        "engine": " ".join(engine), "partition_size": partition_size, "images": int(rate.group(1)),
        "map_seconds": float(rate.group(2)), "images_per_s": float(rate.group(3)),
        "after_startup": float(rate.group(4)) if rate.group(4) else None, "wall_seconds": round(wall, 1),
        "ray_startup_seconds": float(ready.group(1)) if ready else None, "load_before": round(load, 2),
        "peak_mb": {k: (round(v / 2**20) if k != "worker_count" else v) for k, v in sampler.peak.items()},
    }


def same_parts(a: Path, b: Path) -> bool:
    for folder in ("manifest", "failures"):
        left = {p.name: p.read_bytes() for p in (a / folder).glob("*.parquet")}
        right = {p.name: p.read_bytes() for p in (b / folder).glob("*.parquet")}
        if not left or left != right:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--partition-size", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeat):
            for size in args.partition_size:
                local = Path(tmp) / f"local-{size}-{repeat}"
                ours = Path(tmp) / f"ray-{size}-{repeat}"
                rows.append(run_once(args, ["--workers", str(args.workers)], size, local))
                rows.append(run_once(args, ["--engine", "ray", "--ray-address", "local"], size, ours))
                rows[-1]["same_parts_as_local"] = same_parts(ours, local)
    print(f"{args.limit} CelebA test images, {os.cpu_count()} cores\n")
    print("| engine | partition | images/s | after start-up | wall s | Ray start s | peak MB: driver | workers "
          "(n, largest) | Ray system | total | same parts | load before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["peak_mb"]
        engine = "local, --workers " + str(args.workers) if r["engine"].startswith("--workers") else "ray (1 node, 2 CPUs)"
        print(f"| {engine} | {r['partition_size']} | {r['images_per_s']:.2f} | {r['after_startup'] or '-'} | "
              f"{r['wall_seconds']} | {r['ray_startup_seconds'] if r['ray_startup_seconds'] is not None else '-'} | "
              f"{m['driver']} | {m['workers']} ({m['worker_count']}, {m['worker_max']}) | {m['ray_system']} | "
              f"{m['total']} | {r.get('same_parts_as_local', '-')} | {r['load_before']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
