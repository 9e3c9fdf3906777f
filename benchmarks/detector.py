"""Train a YOLO face detector on pseudo-labelled LFW + CelebA images, then its recall
against the default detector's boxes on held-out images, and its CPU speed.

Usage: python benchmarks/detector.py --labels bench-out/eval/lfw --labels bench-out/eval/celeba
           [--images 1500] [--epochs 3] [--imgsz 256] [--out bench-out/train/detector]

The labels are galleries made by face-train label / face-index run with the
default pipeline, so "recall" is agreement with dlib-hog: the share of its boxes
that the YOLO model finds with IoU >= 0.5 on the validation images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("YOLO_OFFLINE", "1")

from data.images import load_image  # noqa: E402
from embedder.registry import create  # noqa: E402
from training.samples import read_labels  # noqa: E402
from training.yolo import train_yolo, write_yolo_dataset  # noqa: E402

log = logging.getLogger("bench.detector")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = np.maximum(a[:2], b[:2])
    x2, y2 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", action="append", required=True)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="bench-out/train/detector")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rng = np.random.default_rng(0)
    samples = []
    for labels in args.labels:
        faces = read_labels(labels, largest_only=False)
        paths = sorted({f.path for f in faces})
        keep = set(rng.choice(paths, size=min(len(paths), args.images // len(args.labels)), replace=False).tolist())
        samples += [f for f in faces if f.path in keep]
    out = Path(args.out)
    dataset = write_yolo_dataset(samples, out / "data", val_fraction=0.15)
    start = time.perf_counter()
    weights = train_yolo(dataset.data_yaml, out / "train", epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=2)
    train_seconds = time.perf_counter() - start

    val_images = sorted((out / "data" / "images" / "val").iterdir())
    truth: dict[str, list[np.ndarray]] = {}
    for s in samples:
        truth.setdefault(str(Path(s.path).resolve()), []).append(np.array(s.box))
    yolo = create("detector", "yolo", weights=str(weights), conf=0.25, imgsz=args.imgsz, device="cpu")
    hog = create("detector", "dlib-hog")
    found = total = 0
    times = {"yolo": [], "dlib-hog": []}
    for path in val_images:
        image = load_image(path)
        for name, detector in (("yolo", yolo), ("dlib-hog", hog)):
            t = time.perf_counter()
            detections = detector.detect(image)
            times[name].append(time.perf_counter() - t)
            if name == "yolo":
                boxes = [np.array(d.box) for d in detections]
        for box in truth[str(path.resolve())]:
            total += 1
            found += any(iou(box, b) >= 0.5 for b in boxes)
    report = {
        "train_images": dataset.train_images, "val_images": dataset.val_images, "faces": dataset.faces,
        "epochs": args.epochs, "imgsz": args.imgsz, "train_seconds": train_seconds,
        "recall_vs_dlib_hog": found / max(total, 1), "val_faces": total,
        "ms_per_image": {k: 1000 * float(np.median(v[1:] or v)) for k, v in times.items()}, "weights": str(weights),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
