"""benchmarks/accuracy.py: its TTA crops and its `none` / `flip` vectors, on one real CelebA face."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CELEBA

REPO = Path(__file__).resolve().parents[1]
IMAGE = CELEBA / "img_align_celeba" / "182638.jpg"


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_scale_factors_are_dlib_paddings(accuracy):
    from embedder.align import dlib_chip_template

    base = dlib_chip_template(150, 0.25)
    for padding, factor in zip((0.20, 0.30), accuracy.DEFAULT_SCALES):
        scaled = accuracy.scaled_template(base, factor)
        np.testing.assert_allclose(scaled.array(), dlib_chip_template(150, padding).array(), atol=1e-9)


@pytest.mark.needs_data
def test_shift_moves_the_crop_and_none_is_the_pipeline(accuracy, tmp_path):
    from data.images import load_image
    from embedder.pipeline import FacePipeline

    pipeline = FacePipeline()
    faces, _ = accuracy.detect_faces(pipeline, [(str(IMAGE), "celeba", "x")], tmp_path / "detections.npz")
    again, info = accuracy.detect_faces(pipeline, [(str(IMAGE), "celeba", "x")], tmp_path / "detections.npz")
    assert info["images_detected_now"] == 0 and np.array_equal(again.keypoints, faces.keypoints)
    assert list(faces.status) == [accuracy.DETECTED]

    embedder = pipeline.embedder
    kinds = accuracy.crop_kinds(embedder.crop, 2.0, accuracy.DEFAULT_SCALES)
    image, det = load_image(IMAGE), faces.detection(0)
    base = accuracy.align_face(image, det, kinds["base"]).astype(int)
    m = 8  # interior margin
    for (dx, dy), kind in (((2, 0), "shift+2,+0"), ((0, -2), "shift+0,-2")):
        shifted = accuracy.align_face(image, det, kinds[kind]).astype(int)
        # the face moves by (dx, dy): shifted[y + dy, x + dx] == base[y, x], up to the last bit
        # (dlib truncates its double-precision samples to uint8)
        moved = shifted[m + dy : 150 - m + dy, m + dx : 150 - m + dx]
        diff = np.abs(moved - base[m : 150 - m, m : 150 - m])
        assert diff.max() <= 1 and (diff == 0).mean() > 0.95, (kind, diff.max(), (diff == 0).mean())
        assert np.abs(shifted[m:-m, m:-m] - base[m:-m, m:-m]).mean() > 2  # and it did move

    needed = {("base", False), ("base", True)}
    embeddings, _ = accuracy.embed_faces(embedder, faces, kinds, needed, cache=None)
    none = accuracy.variant_vectors(embeddings, accuracy.parse_variant("none", kinds))
    flip = accuracy.variant_vectors(embeddings, accuracy.parse_variant("flip", kinds))
    np.testing.assert_allclose(none[0], pipeline(image)[0].embedding, atol=1e-6)
    flipped = FacePipeline(flip=True)
    flipped.embedder = embedder
    np.testing.assert_allclose(flip[0], flipped(image)[0].embedding, atol=1e-6)
    assert accuracy.parse_variant("flip+shift", kinds).crops_per_face == 10
    assert accuracy.parse_variant("flip+scale", kinds).crops_per_face == 6
    with pytest.raises(ValueError, match="unknown TTA variant"):
        accuracy.parse_variant("flip+rotate", kinds)
