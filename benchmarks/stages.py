"""Milliseconds per pipeline stage, in one process, on real CelebA and LFW images.

Usage: python benchmarks/stages.py [--images 300] [--threads 1]
           [--variant "dlib-only=embedder=dlib-resnet,upsample=always-small"] ...

Stages: decode (load_image), detect, landmarks, align (face chips), embed
(all chips of the sample in batches of 64). Times are per image, averaged over
the sample; embed is also given per face.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))

from data.images import load_image  # noqa: E402
from data.readers import read_dataset  # noqa: E402
from embedder.pipeline import FacePipeline, PipelineConfig  # noqa: E402
from embedder.runtime import configure_process  # noqa: E402


def parse_variant(text: str) -> tuple[str, PipelineConfig]:
    label, _, spec = text.partition("=")
    fields: dict = {}
    detector: dict = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key in ("upsample", "max_side"):
            detector[key] = int(value) if value.isdigit() else value
        elif key == "flip":
            fields["flip"] = value.lower() in ("1", "true", "yes")
        else:
            fields[key] = value
    return label, PipelineConfig(detector_options=detector, **fields)


def time_stages(pipeline: FacePipeline, paths: list[Path]) -> dict:
    totals = dict.fromkeys(("decode", "detect", "landmarks", "align", "embed"), 0.0)
    chips = []
    for path in paths:
        t0 = time.perf_counter()
        image = load_image(path)
        t1 = time.perf_counter()
        detections = pipeline.detector.detect(image)
        t2 = time.perf_counter()
        detections = pipeline.landmarker.landmarks(image, detections)
        t3 = time.perf_counter()
        crops = pipeline.crops(image, detections)
        t4 = time.perf_counter()
        chips.extend(crops)
        for key, value in zip(("decode", "detect", "landmarks", "align"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += value
    pipeline.embed_crops(np.stack(chips[:2]))  # warm-up (model load, first-call allocations)
    t0 = time.perf_counter()
    for i in range(0, len(chips), 64):
        pipeline.embed_crops(np.stack(chips[i : i + 64]))
    totals["embed"] = time.perf_counter() - t0
    n = len(paths)
    result = {f"{k}_ms": round(1000 * v / n, 2) for k, v in totals.items()}
    result["total_ms"] = round(sum(1000 * v / n for v in totals.values()), 2)
    result["faces"] = len(chips)
    result["embed_ms_per_face"] = round(1000 * totals["embed"] / max(1, len(chips)), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for batched embedders")
    parser.add_argument("--variant", action="append", default=None)
    parser.add_argument("--out", default="bench-out/stages.json")
    args = parser.parse_args()
    configure_process(torch_threads=args.threads)
    samples = {
        "CelebA test crops": [SHARED / "celeba" / r.path for r in read_dataset(SHARED / "celeba", "celeba", "test").records[: args.images]],
        "LFW": [SHARED / "lfw" / r.path for r in read_dataset(SHARED / "lfw", "lfw").records[:: 13233 // args.images][: args.images]],
    }
    rows = []
    for text in args.variant or ["default="]:
        label, config = parse_variant(text)
        pipeline = FacePipeline(config)
        pipeline(load_image(samples["LFW"][0]))  # load every model before timing
        for dataset, paths in samples.items():
            row = {"dataset": dataset, "pipeline": label, "images": len(paths), **time_stages(pipeline, paths)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("\n| dataset | pipeline | decode | detect | landmarks | align | embed | total ms/image | embed ms/face |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['pipeline']} | {r['decode_ms']} | {r['detect_ms']} | {r['landmarks_ms']} | "
              f"{r['align_ms']} | {r['embed_ms']} | {r['total_ms']} | {r['embed_ms_per_face']} |")


if __name__ == "__main__":
    main()
