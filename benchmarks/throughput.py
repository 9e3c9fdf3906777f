"""Images/s and peak memory of ``face-index run`` on real CelebA and LFW images.

Usage: python benchmarks/throughput.py [--images 500] [--workers 1 2] [--out bench-out/throughput.json]
           [--variant "dlib-only=--embedder dlib-resnet --upsample always-small"] ...

Each configuration runs the real command in a fresh process. "images/s" is
the indexer's own rate from the start of processing (worker start-up and
model loading included) to the last Parquet write; "after start-up" counts
from the first images that came back, the rate a long run settles at;
"wall" adds process start and the FAISS build. Peak
memory is the largest sum of RSS over the command's process tree, sampled
every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))


def _tree_rss(pid: int) -> int:
    """Sum of RSS (bytes) of pid and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    stack.extend(int(c) for c in handle.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def run_once(dataset: str, fmt: str, extra: list[str], images: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "indexer.cli", "run", dataset, "--format", fmt, *extra, "--limit", str(images),
               "--workers", str(workers), "--no-progress", "--out", f"{tmp}/g"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - start
        log = proc.stderr.read()
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{log[-3000:]}")
        match = re.search(r"\(([\d.]+) images/s(?:, ([\d.]+) images/s after start-up)?\)", log)
        rate = float(match.group(1))
        steady = float(match.group(2)) if match.group(2) else rate
        info = json.loads(Path(f"{tmp}/g/gallery.json").read_text())
    counts = info["counts"]
    return {"images": images, "workers": workers, "images_per_s": rate, "steady_images_per_s": steady,
            "wall_s": round(wall, 1),
            "peak_rss_mib": round(peak / 2**20), "faces": counts["faces"], "no_face": counts["no_face"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="bench-out/throughput.json")
    parser.add_argument("--variant", action="append", default=None,
                        help='LABEL=face-index run options; repeatable (default: "default=", the default pipeline)')
    args = parser.parse_args()
    variants = [v.split("=", 1) for v in (args.variant or ["default="])]
    datasets = [
        ("CelebA test crops", str(SHARED / "celeba"), "celeba", ["--split", "test"]),
        ("LFW", str(SHARED / "lfw"), "lfw", []),
    ]
    rows = []
    for label, root, fmt, extra in datasets:
        for name, options in variants:
            for workers in args.workers:
                row = {"dataset": label, "pipeline": name,
                       **run_once(root, fmt, extra + shlex.split(options), args.images, workers)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("\n| dataset | pipeline | images | workers | images/s | after start-up | wall s | peak RSS MiB | faces | no face |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['pipeline']} | {r['images']} | {r['workers']} | {r['images_per_s']:.2f} | "
              f"{r['steady_images_per_s']:.2f} | {r['wall_s']} | "
              f"{r['peak_rss_mib']} | {r['faces']} | {r['no_face']} |")


if __name__ == "__main__":
    main()
