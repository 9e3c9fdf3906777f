"""Training samples from a labels directory: a gallery made by ``face-train label``
(or ``face-index run``), whose manifest holds each face's box, 5 landmarks and identity."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.images import ImageLoadError, load_image
from embedder.align import AlignTemplate, warp
from embedder.crops import square_crop
from embedder.geometry import estimate_similarity
from facesearch.errors import DatasetError
from indexer.layout import GalleryLayout, read_json, read_tables

log = logging.getLogger(__name__)


class LabelsError(DatasetError, ValueError):
    """A labels directory that cannot be used, and why."""


@dataclass(frozen=True, eq=False)
class FaceSample:
    path: str  # absolute image path
    identity: str | None
    box: tuple[float, float, float, float]
    landmarks: np.ndarray  # (5, 2) image pixels, canonical order
    width: int
    height: int


def label_dataset(root: str, format: str, out: str | os.PathLike[str], split: str | None = None,
                  limit: int | None = None, workers: int | None = None) -> Path:
    """Pseudo-label a dataset with the default pipeline: boxes, 5 landmarks and identities
    of every face, written as a gallery (manifest + index) that the trainers read."""
    from indexer import RunConfig, run_index

    run_index(RunConfig(dataset_root=str(root), format=format, split=split or "all", limit=limit), out,
              workers=workers, progress=True)
    return Path(out)


def read_labels(labels_dir: str | os.PathLike[str], largest_only: bool = True) -> list[FaceSample]:
    """The faces of a labels directory. ``largest_only``: one face per image (the
    labelled person in identity datasets); False keeps every face (detector training)."""
    layout = GalleryLayout(Path(labels_dir))
    directory = layout.root
    if not layout.run_file.is_file():
        raise LabelsError(f"{directory} is not a labels directory (no run.json): make one with face-train label")
    root = Path(read_json(layout.run_file)["dataset_root"])
    info = layout.read_info() if layout.info_file.is_file() else None
    columns = ["path", "identity", "face_index", "box", "landmarks", "width", "height"]
    table = read_tables(layout.manifest_files(info), columns)
    if table is None:
        raise LabelsError(f"{directory} has no manifest partitions: the labelling run found nothing")
    boxes = np.asarray(table.column("box").combine_chunks().flatten().to_numpy(), np.float64).reshape(-1, 4)
    points = np.asarray(table.column("landmarks").combine_chunks().flatten().to_numpy(), np.float64).reshape(-1, 5, 2)
    out = []
    for i, (path, identity, face_index, width, height) in enumerate(zip(
            table.column("path").to_pylist(), table.column("identity").to_pylist(), table.column("face_index").to_pylist(),
            table.column("width").to_pylist(), table.column("height").to_pylist())):
        if largest_only and face_index != 0:
            continue
        out.append(FaceSample(str(root / path), identity, tuple(boxes[i]), points[i], int(width), int(height)))
    if not out:
        raise LabelsError(f"{directory}: no faces")
    return out


def split_identities(samples: list[FaceSample], val_identities: int, seed: int = 0) -> tuple[list[FaceSample], list[FaceSample]]:
    """Hold out ``val_identities`` whole identities (with >= 2 faces, so they make same-person pairs)."""
    counts: dict[str, int] = {}
    for s in samples:
        if s.identity is not None:
            counts[s.identity] = counts.get(s.identity, 0) + 1
    eligible = sorted(i for i, n in counts.items() if n >= 2)
    if len(eligible) < val_identities + 2:
        raise LabelsError(f"need at least {val_identities + 2} identities with 2+ faces, found {len(eligible)}")
    held = set(np.random.default_rng(seed).choice(eligible, size=val_identities, replace=False).tolist())
    train = [s for s in samples if s.identity is not None and s.identity not in held]
    val = [s for s in samples if s.identity in held]
    return train, val


def _images(samples: list[FaceSample]):  # noqa: ANN202
    """Each sample with its decoded image (images decoded once, in path order)."""
    current, image = None, None
    for s in samples:
        if s.path != current:
            current = s.path
            try:
                image = load_image(s.path)
            except ImageLoadError as err:
                log.warning("skipping %s: %s", s.path, err.reason)
                image = None
        if image is not None:
            yield s, image


def aligned_crops(samples: list[FaceSample], template: AlignTemplate) -> tuple[np.ndarray, list[FaceSample]]:
    """Crops aligned on ``template`` (N, S, S, 3) uint8, and the samples they came from."""
    crops, kept = [], []
    dst = template.array()
    for s, image in _images(samples):
        matrix = estimate_similarity(s.landmarks, dst)
        crops.append(warp(image, matrix, template.size))
        kept.append(s)
    return (np.stack(crops) if crops else np.zeros((0, template.size[1], template.size[0], 3), np.uint8)), kept


def landmark_crops(samples: list[FaceSample], size: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Square crops around each box (N, size, size, 3) and the landmarks in them as
    fractions of the crop side (N, 5, 2)."""
    crops, targets = [], []
    for s, image in _images(samples):
        crop, (left, top, side) = square_crop(image, s.box, size, margin)
        crops.append(crop)
        targets.append((s.landmarks - np.array([left, top])) / side)
    return np.stack(crops), np.asarray(targets, np.float32)
