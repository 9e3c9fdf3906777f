"""``face-train detector``: YOLO pose data (one class, 5 keypoints) and training through ultralytics.

The dataset layout ultralytics expects::

    OUT/images/{train,val}/NAME.jpg     symlinks to the original images
    OUT/labels/{train,val}/NAME.txt     one line per face: 0 cx cy w h  x1 y1 v1 ... x5 y5 v5 (normalised)
    OUT/data.yaml                       kpt_shape [5, 3], flip_idx [1, 0, 2, 4, 3]

ultralytics is AGPL-3.0.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from facesearch.errors import DatasetError
from training.augment import FLIP_ORDER
from training.samples import FaceSample, read_labels

log = logging.getLogger(__name__)

KPT_SHAPE = (5, 3)


class DetectorDataError(DatasetError, ValueError):
    """Annotations that cannot be converted, and why."""


@dataclass(frozen=True)
class YoloDataset:
    root: Path
    data_yaml: Path
    train_images: int
    val_images: int
    faces: int


def _offline() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no hub calls, no update checks


def has_celeba_wild(root: str | os.PathLike[str]) -> bool:
    """Whether a CelebA root has the in-the-wild images and their box and landmark files."""
    base = Path(root)
    return all(p.exists() for p in (base / "img_celeba", base / "Anno" / "list_bbox_celeba.txt",
                                     base / "Anno" / "list_landmarks_celeba.txt"))


def celeba_wild_samples(root: str | os.PathLike[str]) -> list[FaceSample]:
    """CelebA in-the-wild: ``img_celeba/`` with ``Anno/list_bbox_celeba.txt`` (x, y, w, h)
    and ``Anno/list_landmarks_celeba.txt`` (lefteye, righteye, nose, leftmouth, rightmouth)."""
    from PIL import Image

    base = Path(root)
    bbox_file, lm_file, images = base / "Anno" / "list_bbox_celeba.txt", base / "Anno" / "list_landmarks_celeba.txt", base / "img_celeba"
    for needed in (bbox_file, lm_file, images):
        if not needed.exists():
            raise DetectorDataError(f"{needed} is missing: the in-the-wild CelebA needs img_celeba/ and both annotation files "
                                    "(for aligned images or other datasets, pseudo-label with face-train label)")

    def rows(path: Path) -> dict[str, list[float]]:
        out = {}
        for line in path.read_text(encoding="utf-8").splitlines()[2:]:  # count line, header line
            parts = line.split()
            if len(parts) >= 5:
                out[parts[0]] = [float(v) for v in parts[1:]]
        return out

    boxes, points = rows(bbox_file), rows(lm_file)
    out = []
    for name, (x, y, w, h) in sorted(boxes.items()):
        path = images / name
        if name not in points or not path.is_file():
            continue
        with Image.open(path) as im:
            width, height = im.size
        out.append(FaceSample(str(path), None, (x, y, x + w, y + h), np.asarray(points[name], np.float64).reshape(5, 2),
                              width, height))
    if not out:
        raise DetectorDataError(f"{base}: no image has both a box and landmarks on disk")
    return out


def label_line(sample: FaceSample) -> str:
    """One YOLO pose line; keypoints outside the image are marked invisible (v = 0)."""
    w, h = sample.width, sample.height
    x1, y1, x2, y2 = (float(v) for v in sample.box)
    x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
    values = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
    for px, py in sample.landmarks:
        inside = 0 <= px < w and 0 <= py < h
        values += [px / w if inside else 0.0, py / h if inside else 0.0, 2.0 if inside else 0.0]
    return "0 " + " ".join(f"{v:.6f}" for v in values)


def write_yolo_dataset(samples: Iterable[FaceSample], out: str | os.PathLike[str], val_fraction: float = 0.1,
                       seed: int = 0) -> YoloDataset:
    """Write the YOLO pose layout for ``samples`` (all faces of each image), split by image.
    Rewritten whole on a rerun."""
    by_image: dict[str, list[FaceSample]] = {}
    for s in samples:
        by_image.setdefault(s.path, []).append(s)
    if len(by_image) < 2:
        raise DetectorDataError(f"need at least 2 images, got {len(by_image)}")
    root = Path(out)
    for sub in ("images", "labels"):
        shutil.rmtree(root / sub, ignore_errors=True)
    paths = sorted(by_image)
    order = np.random.default_rng(seed).permutation(len(paths))
    n_val = max(1, int(round(len(paths) * val_fraction)))
    split = {paths[i]: ("val" if rank < n_val else "train") for rank, i in enumerate(order)}
    faces = 0
    for number, path in enumerate(paths):
        part = split[path]
        stem = f"{number:07d}_{Path(path).stem}"
        (root / "images" / part).mkdir(parents=True, exist_ok=True)
        (root / "labels" / part).mkdir(parents=True, exist_ok=True)
        (root / "images" / part / f"{stem}{Path(path).suffix.lower()}").symlink_to(Path(path).resolve())
        lines = [label_line(s) for s in by_image[path]]
        faces += len(lines)
        (root / "labels" / part / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        f"path: {root.resolve()}\ntrain: images/train\nval: images/val\n"
        f"kpt_shape: [{KPT_SHAPE[0]}, {KPT_SHAPE[1]}]\nflip_idx: [{', '.join(str(i) for i in FLIP_ORDER)}]\n"
        "names:\n  0: face\n", encoding="utf-8")
    n_train = sum(1 for p in paths if split[p] == "train")
    log.info("YOLO pose data: %d train and %d val images, %d faces, in %s", n_train, len(paths) - n_train, faces, root)
    return YoloDataset(root, data_yaml, n_train, len(paths) - n_train, faces)


def detector_samples(source: str, format: str) -> list[FaceSample]:
    """Faces to train on: CelebA in-the-wild annotations, or a labels directory (all faces)."""
    if format == "celeba-wild":
        return celeba_wild_samples(source)
    if format == "labels":
        return read_labels(source, largest_only=False)
    raise DetectorDataError(f"unknown detector data format {format!r}: celeba-wild or labels")


def train_yolo(data_yaml: Path, out: str | os.PathLike[str], model: str = "yolov8n-pose.yaml", epochs: int = 50,
               imgsz: int = 640, batch: int = 16, device: str = "auto", workers: int = 2, patience: int = 20,
               fraction: float = 1.0) -> Path:
    """Train with ultralytics; returns the best weights. ``model``: a model yaml (from
    scratch, no download) or a checkpoint path to fine-tune."""
    _offline()
    try:
        from ultralytics import YOLO
        from ultralytics.utils import SETTINGS
    except ImportError as err:
        raise DetectorDataError("face-train detector needs ultralytics: pip install 'facesearch[train]'") from err
    SETTINGS.update({"sync": False})  # no analytics
    if not model.endswith((".yaml", ".yml")) and not Path(model).is_file():
        raise DetectorDataError(f"{model} does not exist: give a model yaml (e.g. yolov8n-pose.yaml, trained from scratch) "
                                "or a local checkpoint; named hub weights need the network")
    import torch

    dev = ("0" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    out_dir = Path(out).resolve()
    yolo = YOLO(model, task="pose")
    yolo.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, device=dev, workers=workers,
               project=str(out_dir.parent), name=out_dir.name, exist_ok=True, plots=False, amp=dev != "cpu",
               patience=patience, fraction=fraction, verbose=False, pretrained=False)
    best = out_dir / "weights" / "best.pt"
    if not best.is_file():
        best = out_dir / "weights" / "last.pt"
    return best
