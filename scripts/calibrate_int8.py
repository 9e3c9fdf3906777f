"""Measure the activation ranges of dlib-resnet-onnx-int8 and write them into the package.

Usage: python scripts/calibrate_int8.py [--data ../shared/data] [--chips 512]
           [--out embedder/backends/dlib_resnet_int8_ranges.json]

The calibration set is taken from ../shared/data and kept apart from every
evaluation set: the 32 official CelebA images (000001-000032, train split; the
CelebA evaluation uses the test-split people), the faces of the group photos,
and one image each of LFW people who appear nowhere in LFW's pairs.txt (View 2).
Each face is cut by the default pipeline, as at indexing time. The float graph
(affine folded) runs on these chips and ONNX Runtime's MinMax calibration
records each quantised tensor's range; only those numbers are written, no image.
Rerun it when the graph changes (tensor names are part of the file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.images import load_image  # noqa: E402
from data.lfw_pairs import read_pairs  # noqa: E402
from embedder.backends.dlib_onnx import INT8_RANGES, calibrate_int8_ranges  # noqa: E402
from embedder.pipeline import FacePipeline  # noqa: E402

log = logging.getLogger("calibrate_int8")


def calibration_images(data: Path, seed: int = 0) -> list[Path]:
    """CelebA train images, group photos, then LFW people absent from pairs.txt (shuffled)."""
    celeba = [data / "celeba" / "img_align_celeba" / f"{i:06d}.jpg" for i in range(1, 33)]
    photos = sorted((data / "photos").glob("*.jpg"))
    in_pairs = {name for fold in read_pairs(data / "lfw" / "pairs.txt") for pair in fold for name in (pair.name_a, pair.name_b)}
    people = sorted(p for p in (data / "lfw" / "lfw").iterdir() if p.name not in in_pairs)
    random.Random(seed).shuffle(people)
    lfw = [sorted(person.glob("*.jpg"))[0] for person in people]
    return [p for p in celeba if p.exists()] + photos + lfw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--chips", type=int, default=512)
    parser.add_argument("--out", default=INT8_RANGES)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipeline = FacePipeline(embedder="dlib-resnet-onnx")
    chips: list[np.ndarray] = []
    counts = {"celeba": 0, "photos": 0, "lfw": 0}
    for path in calibration_images(args.data):
        crops = pipeline.prepare(load_image(path))[1]
        source = "celeba" if "celeba" in path.parts else "photos" if "photos" in path.parts else "lfw"
        counts[source] += len(crops)
        chips.extend(crops)
        if len(chips) >= args.chips:
            break
    chips = chips[: args.chips]
    log.info("calibrating on %d chips (%s)", len(chips), counts)
    ranges = calibrate_int8_ranges(np.stack(chips))
    import onnxruntime

    header = json.dumps({
        "format": 1,
        "method": "onnxruntime MinMax calibration of the float graph (affine folded); used for per-tensor uint8 activations",
        "onnxruntime": onnxruntime.__version__,
        "calibration": {"chips": len(chips), "faces_from": counts,
                        "note": "CelebA 000001-000032 (train split), the group photos, LFW people absent "
                                "from pairs.txt; no evaluation image"},
    }, indent=1)
    lines = ",\n".join(f"  {json.dumps(name)}: [{lo!r}, {hi!r}]" for name, (lo, hi) in ranges.items())
    Path(args.out).write_text(header[:-2] + ',\n "ranges": {\n' + lines + "\n }\n}\n")
    json.loads(Path(args.out).read_text())  # written as valid JSON
    log.info("wrote %d tensor ranges to %s", len(ranges), os.path.relpath(args.out))


if __name__ == "__main__":
    main()
