"""Accuracy of embedding backends and of test-time augmentation (TTA): CelebA test people and LFW View 2.

Usage: python benchmarks/accuracy.py [--embedders dlib-resnet-onnx [NAME ...]]
                                     [--tta none flip shift flip+shift scale flip+scale]
                                     [--shift 2] [--scales 1.0714 0.9375] [--timing-faces 256]
                                     [--celeba ../shared/data/celeba] [--lfw ../shared/data/lfw]
                                     [--cache bench-out/accuracy-cache] [--out bench-out/accuracy.json]

Faces: every CelebA test-split image present on disk (one face per image: the face
nearest the image centre among those at least half as tall as the tallest, as
``search.evaluate.labelled_faces`` picks it; images without a detected face are left
out, as a gallery leaves them out) and every image named in LFW's pairs.txt (the
detected face nearest the centre; where none is detected, the median detected box,
with landmarks found in it, as ``benchmarks/lfw.py`` does). Detection and landmarks
run once per image with the default detector and landmarks, and are cached in
CACHE/detections.npz; each embedder's embeddings of each crop are cached in CACHE/emb/,
keyed by the embedder's name, version and options, the crop's template and the
detections, so a rerun (or a run that adds an embedder) only embeds what is new.

TTA variants are "+"-joined parts: ``none``, ``flip`` (each crop also mirrored),
``shift`` (the crop and 4 crops whose template is moved by +-SHIFT chip pixels in x
and in y), ``scale`` (the crop and crops whose template is scaled by each of SCALES
about the crop's centre; for dlib's chip, 1.5/1.4 and 1.5/1.6 are exactly padding
0.20 and 0.30 instead of 0.25). A variant's vector is the L2-normalised sum of the
(L2-normalised) embeddings of all its crops.

Metrics per embedder x variant: CelebA verification over all pairs (TPR at FPR 1e-2,
1e-3, 1e-4 and ROC AUC, ``search.metrics.verification``) and leave-one-out rank-1
(``search.metrics.identification``); LFW View 2 10-fold accuracy
(``search.metrics.ten_fold_accuracy``); embedding ms per face on one thread, timed
on TIMING_FACES faces (cutting the variant's crops and embedding them, best of
--timing-rounds); and, for each embedder after the first, the cosine between its
``none`` vectors and the first embedder's on the same crops. One process, one thread.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one core: the machine is shared

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.images import load_image  # noqa: E402
from data.lfw_pairs import read_pairs  # noqa: E402
from data.readers import lfw_image_dir, read_celeba  # noqa: E402
from embedder import registry  # noqa: E402
from embedder.align import AlignTemplate, align_face  # noqa: E402
from embedder.pipeline import FacePipeline  # noqa: E402
from embedder.runtime import configure_process  # noqa: E402
from embedder.types import Detection  # noqa: E402
from embedder.vectors import l2_normalize  # noqa: E402
from search.metrics import identification, ten_fold_accuracy, verification  # noqa: E402

log = logging.getLogger("bench.accuracy")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FPRS = (1e-2, 1e-3, 1e-4)
TTA_PARTS = ("none", "flip", "shift", "scale")
DEFAULT_SCALES = (1.5 / 1.4, 1.5 / 1.6)  # dlib chip padding 0.20 and 0.30 instead of 0.25
FALLBACK_BOX = (68.0, 68.0, 182.0, 182.0)  # replaced by the median detected LFW box
DETECTED, FALLBACK, NO_FACE = 0, 1, 2


# --------------------------------------------------------------------------- TTA crops


def shifted_template(template: AlignTemplate, dx: float, dy: float) -> AlignTemplate:
    """``template`` with its points moved by (dx, dy) crop pixels: the face moves by (dx, dy) in the crop."""
    points = tuple((x + dx, y + dy) for x, y in template.points)
    return dataclasses.replace(template, name=f"{template.name}-shift{dx:+g}{dy:+g}", points=points)


def scaled_template(template: AlignTemplate, factor: float) -> AlignTemplate:
    """``template`` with its points scaled by ``factor`` about the crop's centre: the face is
    ``factor`` times as large in the crop (for dlib's chip of padding p, padding q is the
    factor (1 + 2p) / (1 + 2q))."""
    cx, cy = template.size[0] / 2, template.size[1] / 2
    points = tuple((cx + factor * (x - cx), cy + factor * (y - cy)) for x, y in template.points)
    return dataclasses.replace(template, name=f"{template.name}-scale{factor:.4f}", points=points)


@dataclass(frozen=True)
class Variant:
    """A TTA variant: the crop templates it embeds (keys of the crop table) and whether each is also mirrored."""

    name: str
    kinds: tuple[str, ...]
    flip: bool

    @property
    def crops_per_face(self) -> int:
        return len(self.kinds) * (2 if self.flip else 1)

    def members(self) -> list[tuple[str, bool]]:
        """(kind, mirrored) of every crop the variant averages."""
        return [(kind, mirrored) for kind in self.kinds for mirrored in ((False, True) if self.flip else (False,))]


def crop_kinds(template: AlignTemplate, shift: float, scales: Sequence[float]) -> dict[str, AlignTemplate]:
    """Every crop template any variant may use, by kind name."""
    kinds = {"base": template}
    for dx, dy in ((shift, 0.0), (-shift, 0.0), (0.0, shift), (0.0, -shift)):
        kinds[f"shift{dx:+g},{dy:+g}"] = shifted_template(template, dx, dy)
    for factor in scales:
        kinds[f"scale{factor:.4f}"] = scaled_template(template, factor)
    return kinds


def parse_variant(name: str, kinds: dict[str, AlignTemplate]) -> Variant:
    """``none``, ``flip``, ``shift``, ``scale`` or a "+"-joined combination such as ``flip+shift``."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in TTA_PARTS]
    if unknown or not parts or len(set(parts)) != len(parts) or ("none" in parts and len(parts) > 1):
        raise ValueError(f"unknown TTA variant {name!r}: join {', '.join(TTA_PARTS[1:])} with '+', or give none")
    chosen = ["base"]
    if "shift" in parts:
        chosen += [k for k in kinds if k.startswith("shift")]
    if "scale" in parts:
        chosen += [k for k in kinds if k.startswith("scale")]
    return Variant(name, tuple(chosen), "flip" in parts)


def mirror(crops: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) crops mirrored left-right, as FacePipeline.embed_crops does for flip."""
    return np.ascontiguousarray(crops[:, :, ::-1])


def variant_vectors(embeddings: dict[tuple[str, bool], np.ndarray], variant: Variant) -> np.ndarray:
    """One L2-normalised vector per face: the normalised sum of the variant's crop embeddings."""
    total = sum(embeddings[member].astype(np.float64) for member in variant.members())
    return l2_normalize(np.asarray(total, dtype=np.float32))


# --------------------------------------------------------------------------- faces


@dataclass
class Faces:
    """One face per image of both datasets, in one order: CelebA first, then LFW."""

    paths: list[str]
    dataset: np.ndarray  # "celeba" / "lfw"
    labels: np.ndarray  # CelebA identity, or the LFW name
    status: np.ndarray  # DETECTED / FALLBACK / NO_FACE
    boxes: np.ndarray  # (N, 4)
    keypoints: np.ndarray  # (N, K, 2)
    landmarks: np.ndarray  # (N, 5, 2)
    keypoint_scheme: str | None

    def detection(self, i: int) -> Detection:
        return Detection(box=tuple(self.boxes[i]), score=0.0, landmarks=self.landmarks[i],
                         keypoints=self.keypoints[i], keypoint_scheme=self.keypoint_scheme)

    def usable(self) -> np.ndarray:
        return np.flatnonzero(self.status != NO_FACE)


def _pick(detections: Sequence[Detection], image: np.ndarray, labelled: bool) -> Detection | None:
    """The face nearest the image centre; with ``labelled``, among faces at least half as
    tall as the tallest (search.evaluate.labelled_faces), else among all (benchmarks/lfw.py)."""
    if not detections:
        return None
    cy, cx = image.shape[0] / 2, image.shape[1] / 2
    if labelled:
        tallest = max(d.height for d in detections)
        detections = [d for d in detections if d.height >= 0.5 * tallest]
    return min(detections, key=lambda d: ((d.box[0] + d.box[2]) / 2 - cx) ** 2 + ((d.box[1] + d.box[3]) / 2 - cy) ** 2)


def _stage_fingerprint(pipeline: FacePipeline) -> str:
    stages = {
        "detector": [pipeline.detector.name, pipeline.detector.version(), pipeline.resolved_config().detector_options],
        "landmarks": [pipeline.landmarker.name, pipeline.landmarker.version(),
                      pipeline.resolved_config().landmarks_options],
    }
    return json.dumps(stages, sort_keys=True, default=str)


def detect_faces(pipeline: FacePipeline, jobs: list[tuple[str, str, str]], cache: Path) -> tuple[Faces, dict[str, Any]]:
    """Detect and find landmarks once per image of ``jobs`` (path, dataset, label), cached in ``cache``.

    The cache holds each image's chosen box and its landmarks (or no face); LFW's
    fallback box (the median detected LFW box) is placed, and its landmarks found,
    on every run, since it depends on the whole set.
    """
    fingerprint = _stage_fingerprint(pipeline)
    cached: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None] = {}
    scheme = None
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            if str(data["fingerprint"]) == fingerprint:
                scheme = str(data["scheme"]) or None
                for path, found, box, kp, lm in zip(data["paths"], data["found"], data["boxes"], data["keypoints"],
                                                    data["landmarks"]):
                    cached[str(path)] = (box, kp, lm) if found else None
                log.info("detections of %d images read from %s", len(cached), cache)
            else:
                log.info("%s was made by other detector/landmark settings: detecting again", cache)
    todo = [(path, dataset) for path, dataset, _ in jobs if path not in cached]
    start = time.perf_counter()
    for n, (path, dataset) in enumerate(todo, 1):
        image = load_image(path)
        chosen = _pick(pipeline.detector.detect(image), image, labelled=(dataset == "celeba"))
        if chosen is None:
            cached[path] = None
        else:
            det = pipeline.landmarker.landmarks(image, [chosen])[0]
            scheme = det.keypoint_scheme
            keypoints = det.keypoints if det.keypoints is not None else det.landmarks
            cached[path] = (np.asarray(det.box, np.float64), np.asarray(keypoints, np.float64),
                            np.asarray(det.landmarks, np.float64))
        if n % 1000 == 0 or n == len(todo):
            log.info("detected %d of %d images (%.1f ms/image)", n, len(todo), 1000 * (time.perf_counter() - start) / n)
    detect_seconds = time.perf_counter() - start
    if todo:
        if scheme is None:  # no face found at all: learn the scheme from a made-up detection
            scheme = pipeline.landmarker.landmarks(np.zeros((64, 64, 3), np.uint8),
                                                   [Detection((8.0, 8.0, 56.0, 56.0), 0.0)])[0].keypoint_scheme
        found = [p for p, v in cached.items() if v is not None]
        shape = cached[found[0]][1].shape if found else (5, 2)
        cache.parent.mkdir(parents=True, exist_ok=True)
        paths = sorted(cached)
        np.savez(
            cache, fingerprint=np.array(fingerprint), scheme=np.array(scheme or ""), paths=np.array(paths),
            found=np.array([cached[p] is not None for p in paths]),
            boxes=np.stack([cached[p][0] if cached[p] is not None else np.full(4, np.nan) for p in paths]),
            keypoints=np.stack([cached[p][1] if cached[p] is not None else np.full(shape, np.nan) for p in paths]),
            landmarks=np.stack([cached[p][2] if cached[p] is not None else np.full((5, 2), np.nan) for p in paths]),
        )
        log.info("detections of %d images written to %s", len(paths), cache)

    lfw_boxes = [cached[p][0] for p, d, _ in jobs if d == "lfw" and cached[p] is not None]
    median_box = tuple(float(v) for v in np.median(np.array(lfw_boxes), axis=0)) if lfw_boxes else FALLBACK_BOX
    status, boxes, keypoints, landmarks = [], [], [], []
    for path, dataset, _ in jobs:
        entry = cached[path]
        if entry is None and dataset == "lfw":  # benchmarks/lfw.py: landmarks in the median box
            image = load_image(path)
            det = pipeline.landmarker.landmarks(image, [Detection(box=median_box, score=0.0)])[0]
            kp = det.keypoints if det.keypoints is not None else det.landmarks
            entry = (np.asarray(det.box, np.float64), np.asarray(kp, np.float64), np.asarray(det.landmarks, np.float64))
            status.append(FALLBACK)
        else:
            status.append(DETECTED if entry is not None else NO_FACE)
        if entry is None:
            entry = (np.full(4, np.nan), None, np.full((5, 2), np.nan))
        boxes.append(entry[0])
        keypoints.append(entry[1])
        landmarks.append(entry[2])
    shape = next((k.shape for k in keypoints if k is not None), (5, 2))
    keypoints = [k if k is not None else np.full(shape, np.nan) for k in keypoints]
    faces = Faces(
        paths=[p for p, _, _ in jobs], dataset=np.array([d for _, d, _ in jobs]),
        labels=np.array([label for _, _, label in jobs], dtype=object), status=np.array(status),
        boxes=np.stack(boxes), keypoints=np.stack(keypoints), landmarks=np.stack(landmarks), keypoint_scheme=scheme,
    )
    info = {"detect_seconds": detect_seconds, "images_detected_now": len(todo), "lfw_fallback_box": median_box,
            "detector": pipeline.resolved_config().detector_options, "fingerprint": json.loads(fingerprint)}
    return faces, info


# --------------------------------------------------------------------------- embedding


def _detections_digest(faces: Faces) -> str:
    h = hashlib.sha1()
    h.update("\n".join(faces.paths).encode())
    for array in (faces.status, faces.boxes, faces.keypoints, faces.landmarks):
        h.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return h.hexdigest()


def _embedder_identity(embedder: Any) -> str:
    options = getattr(embedder, "options", None)
    return json.dumps([embedder.name, embedder.version(), options() if callable(options) else {}], default=str)


def embed_faces(embedder: Any, faces: Faces, kinds: dict[str, AlignTemplate], needed: set[tuple[str, bool]],
                cache: Path | None, chunk: int = 64) -> tuple[dict[tuple[str, bool], np.ndarray], dict[str, Any]]:
    """Embeddings of every usable face for each needed (crop kind, mirrored), read from the
    cache or computed in chunks of ``chunk`` images (each image decoded once per chunk)."""
    usable = faces.usable()
    identity, digest = _embedder_identity(embedder), _detections_digest(faces)
    files: dict[tuple[str, bool], Path] = {}
    out: dict[tuple[str, bool], np.ndarray] = {}
    for kind, mirrored in sorted(needed):
        key = json.dumps([identity, digest, dataclasses.asdict(kinds[kind]), mirrored], default=str)
        name = f"{embedder.name}-{kind}{'-mirror' if mirrored else ''}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"
        files[(kind, mirrored)] = cache / name if cache is not None else None
        if cache is not None and (cache / name).is_file():
            out[(kind, mirrored)] = np.load(cache / name)
    missing = sorted(set(needed) - set(out))
    timing = {"crop_seconds": 0.0, "embed_seconds": 0.0, "crops_embedded": 0, "from_cache": sorted(
        f"{k}{'/mirror' if m else ''}" for k, m in out)}
    if not missing:
        return out, timing
    cut = sorted({kind for kind, _ in missing})
    parts: dict[tuple[str, bool], list[np.ndarray]] = {m: [] for m in missing}
    start = time.perf_counter()
    for begin in range(0, len(usable), chunk):
        rows = usable[begin : begin + chunk]
        t0 = time.perf_counter()
        crops: dict[str, list[np.ndarray]] = {kind: [] for kind in cut}
        for i in rows:
            image = load_image(faces.paths[i])
            det = faces.detection(i)
            for kind in cut:
                crops[kind].append(align_face(image, det, kinds[kind]))
        t1 = time.perf_counter()
        timing["crop_seconds"] += t1 - t0
        for kind, mirrored in missing:
            batch = np.stack(crops[kind])
            parts[(kind, mirrored)].append(embedder.embed(mirror(batch) if mirrored else batch))
            timing["crops_embedded"] += len(batch)
        timing["embed_seconds"] += time.perf_counter() - t1
        done = begin + len(rows)
        if done % (chunk * 16) == 0 or done == len(usable):
            elapsed = time.perf_counter() - start
            log.info("%s: %d of %d faces, %d crops each (%.0f s, about %.0f s left)", embedder.name, done,
                     len(usable), len(missing), elapsed, elapsed / done * (len(usable) - done))
    for member in missing:
        out[member] = np.concatenate(parts[member])
        if files[member] is not None:
            files[member].parent.mkdir(parents=True, exist_ok=True)
            np.save(files[member], out[member])
    return out, timing


def time_variants(embedder: Any, faces: Faces, kinds: dict[str, AlignTemplate], variants: Sequence[Variant],
                  count: int, rounds: int) -> dict[str, dict[str, float]]:
    """Milliseconds per face, on one thread, to cut each variant's crops and to embed them
    (in one embed call, mirrored crops too, as FacePipeline.embed_crops does), on ``count``
    faces spread evenly over both datasets; the best of ``rounds`` passes over the variants."""
    usable = faces.usable()
    rows = usable[np.linspace(0, len(usable) - 1, min(count, len(usable))).astype(int)]
    samples = [(load_image(faces.paths[i]), faces.detection(i)) for i in rows]
    warm = np.stack([align_face(image, det, kinds["base"]) for image, det in samples[:8]])
    embedder.embed(warm)
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for variant in variants:
            t0 = time.perf_counter()
            crops = np.stack([align_face(image, det, kinds[kind]) for image, det in samples for kind in variant.kinds])
            if variant.flip:
                crops = np.concatenate([crops, mirror(crops)])
            t1 = time.perf_counter()
            embedder.embed(crops)
            t2 = time.perf_counter()
            figures = {"crop_ms_per_face": 1000 * (t1 - t0) / len(samples),
                       "embed_ms_per_face": 1000 * (t2 - t1) / len(samples)}
            previous = best.get(variant.name)
            if previous is None or figures["embed_ms_per_face"] < previous["embed_ms_per_face"]:
                best[variant.name] = figures
    for figures in best.values():
        figures["faces"] = len(samples)
    return best


# --------------------------------------------------------------------------- metrics


def celeba_metrics(vectors: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    v = verification(vectors, labels, fprs=FPRS)
    ident = identification(vectors, labels)
    return {
        "faces": len(labels), "identities": len(set(labels)), "genuine_pairs": v.genuine_pairs,
        "impostor_pairs": v.impostor_pairs, "roc_auc": v.auc,
        "operating_points": [{"target_fpr": p.target_fpr, "threshold": p.threshold, "tpr": p.tpr, "fpr": p.fpr}
                             for p in v.points],
        "identification": ident,
    }


def lfw_metrics(vectors: dict[str, np.ndarray], pairs: list[tuple[str, str, bool, int]]) -> dict[str, Any]:
    a = np.stack([vectors[p] for p, _, _, _ in pairs])
    b = np.stack([vectors[q] for _, q, _, _ in pairs])
    mean, std, accs, thresholds = ten_fold_accuracy((a * b).sum(axis=1), np.array([s for _, _, s, _ in pairs]),
                                                    np.array([f for _, _, _, f in pairs]))
    return {"accuracy": mean, "std": std, "fold_accuracies": accs, "thresholds": thresholds}


def _tpr(row: dict[str, Any], fpr: float) -> float:
    return next(p["tpr"] for p in row["celeba"]["operating_points"] if p["target_fpr"] == fpr)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [
        "| embedder | TTA | crops/face | embed ms/face | CelebA TPR@1e-2 | TPR@1e-3 | TPR@1e-4 | rank-1 "
        "| LFW acc ± std | Δ TPR@1e-3 | Δ LFW (pp) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lfw = row["lfw"]
        d_tpr = _tpr(row, 1e-3) - _tpr(first, 1e-3)
        d_lfw = 100 * (lfw["accuracy"] - first["lfw"]["accuracy"])
        lines.append(
            f"| {row['embedder']} | {row['tta']} | {row['crops_per_face']} | {row['timing']['embed_ms_per_face']:.1f} "
            f"| {_tpr(row, 1e-2):.4f} | {_tpr(row, 1e-3):.4f} | {_tpr(row, 1e-4):.4f} "
            f"| {row['celeba']['identification']['rank1']:.4f} "
            f"| {100 * lfw['accuracy']:.2f}% ± {100 * lfw['std']:.2f} | {d_tpr:+.4f} | {d_lfw:+.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedders", nargs="+", default=["dlib-resnet-onnx"],
                        help="registered embedder names; the first is the reference of the deltas and cosines")
    parser.add_argument("--tta", nargs="+", default=["none", "flip", "shift", "flip+shift", "scale", "flip+scale"])
    parser.add_argument("--shift", type=float, default=2.0, help="shift TTA: chip pixels in x and in y (default 2)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                        help="scale TTA: face scale factors (default 1.0714 0.9375: dlib chip padding 0.20, 0.30)")
    parser.add_argument("--celeba", default=str(SHARED / "celeba"))
    parser.add_argument("--lfw", default=str(SHARED / "lfw"))
    parser.add_argument("--timing-faces", type=int, default=256, help="faces the ms/face figures are timed on")
    parser.add_argument("--timing-rounds", type=int, default=2, help="timing passes; the fastest counts")
    parser.add_argument("--cache", default="bench-out/accuracy-cache", help="detections and embeddings cache")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    parser.add_argument("--limit", type=int, default=None,
                        help="smoke test: the first N CelebA images and the first N pairs of each LFW fold")
    parser.add_argument("--out", default="bench-out/accuracy.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    configure_process(torch_threads=1)
    wall = time.perf_counter()

    pipeline = FacePipeline()
    embedders = []
    for name in dict.fromkeys(args.embedders):
        try:
            embedders.append(registry.create("embedder", name))
        except registry.UnknownBackendError as err:
            parser.error(str(err))
    variants_by_embedder: dict[str, list[Variant]] = {}
    kinds_by_embedder: dict[str, dict[str, AlignTemplate]] = {}
    for e in embedders:
        if e.crop.scheme != "canonical5" and getattr(pipeline.landmarker, "scheme", None) != e.crop.scheme:
            parser.error(f"embedder {e.name} aligns on {e.crop.scheme} keypoints, which {pipeline.config.landmarks} "
                         "does not give")
        kinds_by_embedder[e.name] = crop_kinds(e.crop, args.shift, args.scales)
        try:
            variants_by_embedder[e.name] = [parse_variant(v, kinds_by_embedder[e.name]) for v in dict.fromkeys(args.tta)]
        except ValueError as err:
            parser.error(str(err))
    log.info("embedders %s, TTA %s, shift %g px, scales %s", [e.name for e in embedders], args.tta, args.shift,
             [round(s, 4) for s in args.scales])

    celeba_records = read_celeba(args.celeba, split="test").records[: args.limit]
    lfw_root = Path(args.lfw)
    lfw_dir = lfw_image_dir(lfw_root)
    folds = [fold[: args.limit] for fold in read_pairs(lfw_root / "pairs.txt")]
    pairs = [(str(lfw_dir / p.path_a), str(lfw_dir / p.path_b), p.same, fold)
             for fold, fold_pairs in enumerate(folds) for p in fold_pairs]
    lfw_paths = sorted({p for p, _, _, _ in pairs} | {q for _, q, _, _ in pairs})
    jobs = [(str(Path(args.celeba) / r.path), "celeba", str(r.identity)) for r in celeba_records]
    jobs += [(p, "lfw", Path(p).parent.name) for p in lfw_paths]
    log.info("%d CelebA test images of %d people, %d LFW images in %d pairs", len(celeba_records),
             len({r.identity for r in celeba_records}), len(lfw_paths), len(pairs))

    cache = Path(args.cache)
    faces, detection_info = detect_faces(pipeline, jobs, cache / "detections.npz")
    usable = faces.usable()
    in_celeba = faces.dataset[usable] == "celeba"
    celeba_rows = np.flatnonzero(in_celeba)  # positions in the usable order
    lfw_rows = np.flatnonzero(~in_celeba)
    lfw_status = faces.status[faces.dataset == "lfw"]
    celeba_status = faces.status[faces.dataset == "celeba"]
    detection_info.update({
        "celeba_images": int(len(celeba_status)), "celeba_no_face": int((celeba_status == NO_FACE).sum()),
        "lfw_images": int(len(lfw_status)), "lfw_fallback": int((lfw_status == FALLBACK).sum()),
        "lfw_fallback_share": float((lfw_status == FALLBACK).mean()),
    })
    log.info("CelebA: %d of %d images without a face (left out); LFW: %d of %d images on the fallback box (%.2f%%)",
             detection_info["celeba_no_face"], len(celeba_status), detection_info["lfw_fallback"], len(lfw_status),
             100 * detection_info["lfw_fallback_share"])
    celeba_labels = faces.labels[usable][celeba_rows]
    lfw_usable_paths = [faces.paths[i] for i in usable[lfw_rows]]

    rows: list[dict[str, Any]] = []
    reference_none: np.ndarray | None = None
    agreement: dict[str, Any] = {}
    embed_info: dict[str, Any] = {}
    for e in embedders:
        kinds, variants = kinds_by_embedder[e.name], variants_by_embedder[e.name]
        needed = {m for v in variants for m in v.members()} | {("base", False)}
        embeddings, info = embed_faces(e, faces, kinds, needed, None if args.no_cache else cache / "emb")
        embed_info[e.name] = {**info, "version": e.version(), "templates": {k: dataclasses.asdict(kinds[k])
                                                                            for k in sorted({k for k, _ in needed})}}
        log.info("%s: timing %d variants on %d faces", e.name, len(variants), args.timing_faces)
        timings = time_variants(e, faces, kinds, variants, args.timing_faces, args.timing_rounds)
        none_vectors = variant_vectors(embeddings, parse_variant("none", kinds))
        if reference_none is None:
            reference_none = none_vectors
        else:
            cosine = (none_vectors * reference_none).sum(axis=1)
            agreement[e.name] = {
                "reference": embedders[0].name, "faces": int(len(cosine)), "min_cosine": float(cosine.min()),
                "mean_cosine": float(cosine.mean()), "celeba_min_cosine": float(cosine[celeba_rows].min()),
                "lfw_min_cosine": float(cosine[lfw_rows].min()),
            }
            log.info("%s vs %s (none): cosine min %.6f, mean %.6f", e.name, embedders[0].name,
                     cosine.min(), cosine.mean())
        for variant in variants:
            vectors = variant_vectors(embeddings, variant)
            row = {
                "embedder": e.name, "tta": variant.name, "crops_per_face": variant.crops_per_face,
                "crops": [f"{k}{'/mirror' if m else ''}" for k, m in variant.members()],
                "timing": timings[variant.name],
                "celeba": celeba_metrics(vectors[celeba_rows], celeba_labels),
                "lfw": lfw_metrics(dict(zip(lfw_usable_paths, vectors[lfw_rows])), pairs),
            }
            rows.append(row)
            log.info("%s %s: CelebA TPR@1e-3 %.4f, rank-1 %.4f; LFW %.2f%% ± %.2f; %.1f ms/face", e.name, variant.name,
                     _tpr(row, 1e-3), row["celeba"]["identification"]["rank1"], 100 * row["lfw"]["accuracy"],
                     100 * row["lfw"]["std"], row["timing"]["embed_ms_per_face"])

    first = rows[0]
    for row in rows:  # paired per-fold LFW differences against the first row (same folds, same pairs)
        diff = np.array(row["lfw"]["fold_accuracies"]) - np.array(first["lfw"]["fold_accuracies"])
        row["vs_first"] = {
            "tpr@1e-3": _tpr(row, 1e-3) - _tpr(first, 1e-3), "tpr@1e-4": _tpr(row, 1e-4) - _tpr(first, 1e-4),
            "rank1": row["celeba"]["identification"]["rank1"] - first["celeba"]["identification"]["rank1"],
            "lfw_accuracy": float(diff.mean()), "lfw_fold_diff_std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
            "lfw_folds_better_worse_same": [int((diff > 0).sum()), int((diff < 0).sum()), int((diff == 0).sum())],
        }
    seconds = time.perf_counter() - wall
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "seconds": seconds, "threads": 1, "shift_px": args.shift, "scales": args.scales,
        "detection": detection_info, "embedding": embed_info, "agreement": agreement, "rows": rows,
        "reference": {"embedder": first["embedder"], "tta": first["tta"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    log.info("wrote %s in %.0f s", out, seconds)

    print(markdown_table(rows))
    print(f"\nCelebA test: {len(celeba_rows)} faces of {len(set(celeba_labels))} people "
          f"({detection_info['celeba_no_face']} of {detection_info['celeba_images']} images without a face, left out). "
          f"LFW View 2: {len(pairs)} pairs, {detection_info['lfw_fallback']} of {detection_info['lfw_images']} images "
          f"({100 * detection_info['lfw_fallback_share']:.2f}%) on the fallback box.")
    print(f"TTA: shift ±{args.shift:g} chip px in x and y; scales {', '.join(f'{s:.4f}' for s in args.scales)}. "
          f"ms/face: cutting excluded, one thread, {first['timing']['faces']} faces, best of {args.timing_rounds}.")
    for name, a in agreement.items():
        print(f"{name} vs {a['reference']} (none, same crops, {a['faces']} faces): cosine min {a['min_cosine']:.6f}, "
              f"mean {a['mean_cosine']:.6f}")
    print(f"total {seconds:.0f} s")


if __name__ == "__main__":
    main()
