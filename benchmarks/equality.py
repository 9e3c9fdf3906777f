"""The ports of dlib's ResNet (ONNX Runtime, the default; torch) against dlib's own, on 500+ real faces.

Usage: python benchmarks/equality.py [--images 250] [--embedder dlib-resnet-onnx dlib-resnet-torch]
           [--out bench-out/equality.json]

For each face that the pipeline finds in CelebA test crops, LFW images and the
group photos, compares the full pipeline with each embedder (our face chip, the
port of the ResNet) with dlib's own path on the same landmarks
(``dlib.get_face_chip``, ``face_recognition_model_v1.compute_face_descriptor``).
Requirement: cosine >= 0.9999 for every face.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))

import dlib  # noqa: E402

from data.images import load_image  # noqa: E402
from data.readers import read_dataset  # noqa: E402
from embedder.backends.base import model_path  # noqa: E402
from embedder.pipeline import FacePipeline  # noqa: E402
from embedder.runtime import configure_process  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=250, help="images from each of CelebA and LFW")
    parser.add_argument("--embedder", nargs="+", default=["dlib-resnet-onnx", "dlib-resnet-torch"])
    parser.add_argument("--out", default="bench-out/equality.json")
    args = parser.parse_args()
    configure_process()  # exact fp32 on CUDA: the equality this measures needs it
    celeba = read_dataset(SHARED / "celeba", "celeba", "test").records
    lfw = read_dataset(SHARED / "lfw", "lfw").records
    paths = [SHARED / "celeba" / r.path for r in celeba[:: max(1, len(celeba) // args.images)][: args.images]]
    paths += [SHARED / "lfw" / r.path for r in lfw[:: max(1, len(lfw) // args.images)][: args.images]]
    paths += sorted((SHARED / "photos").glob("*.jpg"))
    pipelines = {name: FacePipeline(embedder=name) for name in args.embedder}
    facerec = dlib.face_recognition_model_v1(model_path("dlib_face_recognition_resnet_model_v1.dat"))
    cosines: dict[str, list[float]] = {name: [] for name in pipelines}
    worst: dict[str, tuple[str, float] | None] = dict.fromkeys(pipelines)
    for path in paths:
        image = load_image(path)
        found = {name: pipeline(image) for name, pipeline in pipelines.items()}
        first = next(iter(found.values()))
        for i, face in enumerate(first):
            parts = [dlib.point(int(x), int(y)) for x, y in face.detection.keypoints]
            shape = dlib.full_object_detection(dlib.rectangle(0, 0, 1, 1), parts)
            chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
            ref = np.asarray(facerec.compute_face_descriptor(chip), dtype=np.float64)
            ref /= np.linalg.norm(ref)
            for name, faces in found.items():
                cosine = float(faces[i].embedding.astype(np.float64) @ ref)
                cosines[name].append(cosine)
                if worst[name] is None or cosine < worst[name][1]:
                    worst[name] = (str(path), cosine)
    report = {}
    for name, values in cosines.items():
        c = np.array(values)
        report[name] = {"faces": len(c), "images": len(paths), "min": float(c.min()), "mean": float(c.mean()),
                        "below_0.9999": int((c < 0.9999).sum()), "worst": worst[name]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
