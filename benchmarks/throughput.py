"""Images/s and peak memory of ``face-index run`` on real CelebA and LFW images.

Usage: python benchmarks/throughput.py [--images 500 [2000 ...]] [--workers 1 2] [--out bench-out/throughput.json]
           [--variant "dlib-only=--embedder dlib-resnet --upsample always-small"] ...
           [--datasets celeba lfw] [--ratio-to dlib-only] [--repeat 1]

With ``--ratio-to LABEL``, each variant's speed is also given as a ratio to that
variant's on the same images in the same run: by wall time (the whole command,
start-up and index build included) and by images/s. ``--repeat`` runs the
variants in turn that many times and keeps each one's best (least disturbed) run,
for a machine that other work shares.

Each configuration runs the real command in a fresh process. "images/s" is
the indexer's own rate from the start of processing (worker start-up and
model loading included) to the last Parquet write; "after start-up" counts
from the first images that came back, the rate a long run settles at;
"wall" adds process start and the FAISS build. Peak
memory is the largest sum of RSS over the command's process tree, sampled
every 50 ms; "per process" the largest RSS of any one process of the tree.
"""

from __future__ import annotations

import argparse
import itertools
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


def _tree_rss(pid: int) -> tuple[int, int]:
    """(sum of RSS, largest RSS of one process), in bytes, over pid and all its descendants."""
    total, largest, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                        total += rss
                        largest = max(largest, rss)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    stack.extend(int(c) for c in handle.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total, largest


def run_once(dataset: str, fmt: str, extra: list[str], images: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "indexer.cli", "run", dataset, "--format", fmt, *extra, "--limit", str(images),
               "--workers", str(workers), "--no-progress", "--out", f"{tmp}/g"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        peak = peak_one = 0
        while proc.poll() is None:
            total, largest = _tree_rss(proc.pid)
            peak, peak_one = max(peak, total), max(peak_one, largest)
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
            "peak_rss_mib": round(peak / 2**20), "peak_process_rss_mib": round(peak_one / 2**20), "faces": counts["faces"], "no_face": counts["no_face"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[500],
                        help="image counts to run (several show how speed and memory grow with the run)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="bench-out/throughput.json")
    parser.add_argument("--variant", action="append", default=None,
                        help='LABEL=face-index run options; repeatable (default: "default=", the default pipeline)')
    parser.add_argument("--datasets", nargs="+", choices=["celeba", "lfw"], default=["celeba", "lfw"])
    parser.add_argument("--ratio-to", default=None, help="LABEL of the variant to give speed ratios against")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant, in turn; the fastest is kept")
    args = parser.parse_args()
    variants = [v.split("=", 1) for v in (args.variant or ["default="])]
    if args.ratio_to is not None and args.ratio_to not in [name for name, _ in variants]:
        parser.error(f"--ratio-to {args.ratio_to}: no such --variant")
    datasets = [
        ("CelebA test crops", str(SHARED / "celeba"), "celeba", ["--split", "test"]),
        ("LFW", str(SHARED / "lfw"), "lfw", []),
    ]
    datasets = [d for d in datasets if d[2] in args.datasets]
    rows = []
    for (label, root, fmt, extra), images, workers in itertools.product(datasets, args.images, args.workers):
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for name, options in variants:
                row = {"dataset": label, "pipeline": name,
                       **run_once(root, fmt, extra + shlex.split(options), images, workers)}
                print(json.dumps(row), flush=True)
                if name not in best or row["wall_s"] < best[name]["wall_s"]:
                    best[name] = row
        base = best.get(args.ratio_to) if args.ratio_to else None
        for name, _ in variants:
            row = best[name]
            if base is not None:
                row["wall_ratio"] = round(base["wall_s"] / row["wall_s"], 2)
                row["rate_ratio"] = round(row["images_per_s"] / base["images_per_s"], 2)
                row["steady_ratio"] = round(row["steady_images_per_s"] / base["steady_images_per_s"], 2)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    ratio = f" x {args.ratio_to}: wall | x: images/s | x: after start-up |" if args.ratio_to else ""
    print("\n| dataset | pipeline | images | workers | images/s | after start-up | wall s | peak RSS MiB, run | "
          f"peak RSS MiB, one process | faces | no face |{ratio}")
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.ratio_to else ""))
    for r in rows:
        extra_cols = (f" {r['wall_ratio']} | {r['rate_ratio']} | {r['steady_ratio']} |" if args.ratio_to else "")
        print(f"| {r['dataset']} | {r['pipeline']} | {r['images']} | {r['workers']} | {r['images_per_s']:.2f} | "
              f"{r['steady_images_per_s']:.2f} | {r['wall_s']} | "
              f"{r['peak_rss_mib']} | {r['peak_process_rss_mib']} | {r['faces']} | {r['no_face']} |{extra_cols}")


if __name__ == "__main__":
    main()
