"""LFW View 2 verification with the default pipeline, with and without flip averaging.

Usage: python benchmarks/lfw.py [--lfw ../shared/data/lfw] [--workers 2] [--out bench-out/lfw.json]
                                [--embedder dlib-resnet] [--upsample always-small] [--max-side 1280]

Each image of pairs.txt is embedded once, plain and mirrored, so both figures
come from one pass. The face used is the detected face nearest the image
centre (LFW centres the labelled person). Where no face is detected, the
median detected box is used as the face box (LFW images are aligned by
their centre), landmarks are found in it as usual, and the share of such
images is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.images import load_image  # noqa: E402
from data.lfw_pairs import read_pairs  # noqa: E402
from data.readers import lfw_image_dir  # noqa: E402
from embedder.pipeline import FacePipeline, PipelineConfig  # noqa: E402
from embedder.runtime import configure_process  # noqa: E402
from embedder.types import Detection  # noqa: E402
from embedder.vectors import l2_normalize  # noqa: E402
from search.metrics import ten_fold_accuracy  # noqa: E402

log = logging.getLogger("bench.lfw")
_PIPELINE: FacePipeline | None = None
FALLBACK_BOX = (68.0, 68.0, 182.0, 182.0)  # replaced by the median detected box


def _init(config: PipelineConfig) -> None:
    global _PIPELINE
    _PIPELINE = FacePipeline(config)


def _detect(path: str) -> tuple[str, tuple[float, ...] | None]:
    image = load_image(path)
    detections = _PIPELINE.detector.detect(image)
    if not detections:
        return path, None
    cy, cx = image.shape[0] / 2, image.shape[1] / 2
    best = min(detections, key=lambda d: ((d.box[0] + d.box[2]) / 2 - cx) ** 2 + ((d.box[1] + d.box[3]) / 2 - cy) ** 2)
    return path, best.box


def _crop(job: tuple[str, tuple[float, ...]]) -> tuple[str, np.ndarray]:
    path, box = job
    image = load_image(path)
    det = _PIPELINE.landmarker.landmarks(image, [Detection(box=box, score=0.0)])
    return path, _PIPELINE.crops(image, det)[0]


def _embed_pair(crop: np.ndarray) -> np.ndarray:
    """(2, dim): the crop's embedding and its mirror image's."""
    return _PIPELINE.embedder.embed(np.stack([crop, np.ascontiguousarray(crop[:, ::-1])]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lfw", default=str(Path(__file__).resolve().parents[2] / "shared/data/lfw"))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="bench-out/lfw.json")
    parser.add_argument("--embedder", default="dlib-resnet")
    parser.add_argument("--upsample", default=None, help="detector upsampling policy (default: the detector's)")
    parser.add_argument("--max-side", type=int, default=None)
    args = parser.parse_args()
    if args.upsample is not None and args.upsample.isdigit():
        args.upsample = int(args.upsample)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    configure_process()

    root = Path(args.lfw)
    folds = read_pairs(root / "pairs.txt")
    image_dir = lfw_image_dir(root)
    pairs = [(p, fold) for fold, fold_pairs in enumerate(folds) for p in fold_pairs]
    paths = sorted({str(image_dir / p.path_a) for p, _ in pairs} | {str(image_dir / p.path_b) for p, _ in pairs})
    log.info("%d pairs, %d distinct images, %d workers", len(pairs), len(paths), args.workers)

    config = PipelineConfig(
        embedder=args.embedder,
        detector_options={k: v for k, v in (("upsample", args.upsample), ("max_side", args.max_side)) if v is not None},
    )
    main_pipeline = FacePipeline(config)
    log.info("pipeline %s", main_pipeline.resolved_config().to_dict())
    start = time.perf_counter()
    with get_context("spawn").Pool(args.workers, initializer=_init, initargs=(config,)) as pool:
        boxes = dict(pool.imap(_detect, paths, chunksize=16))
        detect_seconds = time.perf_counter() - start
        found = [b for b in boxes.values() if b is not None]
        median_box = tuple(float(v) for v in np.median(np.array(found), axis=0)) if found else FALLBACK_BOX
        no_face = [p for p, b in boxes.items() if b is None]
        log.info("no face detected in %d of %d images (%.2f%%)", len(no_face), len(paths), 100 * len(no_face) / len(paths))
        jobs = [(p, boxes[p] or median_box) for p in paths]
        crops = dict(pool.imap(_crop, jobs, chunksize=16))
        embedded = {}
        if main_pipeline.embeds_in_batches:  # batched embedder: here, in large batches
            for i in range(0, len(paths), 128):
                chunk = paths[i : i + 128]
                batch = np.stack([crops[p] for p in chunk])
                plain = main_pipeline.embedder.embed(batch)
                mirrored = main_pipeline.embedder.embed(np.ascontiguousarray(batch[:, :, ::-1]))
                embedded.update({p: (plain[j], mirrored[j]) for j, p in enumerate(chunk)})
        else:  # per-image embedder (dlib): in the worker processes
            for path, pair in zip(paths, pool.imap(_embed_pair, [crops[p] for p in paths], chunksize=8)):
                embedded[path] = (pair[0], pair[1])
    seconds = time.perf_counter() - start

    same = np.array([p.same for p, _ in pairs])
    fold_ids = np.array([f for _, f in pairs])
    results = {}
    for name, pick in (("plain", lambda e: e[0]), ("flip", lambda e: l2_normalize((e[0] + e[1])[None])[0])):
        a = np.stack([pick(embedded[str(image_dir / p.path_a)]) for p, _ in pairs])
        b = np.stack([pick(embedded[str(image_dir / p.path_b)]) for p, _ in pairs])
        scores = (a * b).sum(axis=1)
        mean, std, accs, _ = ten_fold_accuracy(scores, same, fold_ids)
        results[name] = {"accuracy": mean, "std": std, "folds": accs}
        log.info("%s: %.2f%% +- %.2f", name, 100 * mean, 100 * std)
    report = {
        "pairs": len(pairs), "images": len(paths), "no_face": len(no_face),
        "no_face_share": len(no_face) / len(paths), "fallback_box": median_box,
        "seconds": seconds, "detect_seconds": detect_seconds, "workers": args.workers, "results": results,
        "pipeline": main_pipeline.resolved_config().to_dict(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"| pipeline | LFW 10-fold accuracy |\n|---|---|")
    label = f"{args.embedder}, upsample {main_pipeline.detector.upsample}, max_side {main_pipeline.detector.max_side}"
    for name, r in results.items():
        print(f"| {label}, {name} | {100 * r['accuracy']:.2f}% ± {100 * r['std']:.2f} |")
    print(f"\ndetection pass: {detect_seconds:.0f} s; total {seconds:.0f} s with {args.workers} workers")
    print(f"\nno face detected: {len(no_face)} of {len(paths)} images ({100 * len(no_face) / len(paths):.2f}%)")


if __name__ == "__main__":
    main()
