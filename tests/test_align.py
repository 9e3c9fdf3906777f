"""Alignment recovers known similarity transforms; landmark order holds through the pipeline."""

from __future__ import annotations

import dlib
import numpy as np
import pytest

from data.images import load_image
from embedder.align import (
    ARCFACE_112,
    AlignTemplate,
    align_face,
    align_matrix,
    dlib_chip_template,
)
from embedder.geometry import estimate_similarity, transform_points
from embedder.dlib_chip import extract_dlib_chip
from embedder.types import LANDMARK_NAMES, Detection
from tests.conftest import CELEBA, LFW, PHOTOS


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


@pytest.mark.parametrize("seed", range(5))
def test_known_similarity_is_recovered(seed):
    rng = np.random.default_rng(seed)
    truth = _similarity(rng.uniform(0.2, 5), rng.uniform(-np.pi, np.pi), *rng.uniform(-300, 300, 2))
    src = ARCFACE_112.array() + rng.normal(0, 10, (5, 2))
    dst = transform_points(truth, src)
    np.testing.assert_allclose(estimate_similarity(src, dst), truth, atol=1e-9)


def test_least_squares_with_noise_and_no_reflection():
    rng = np.random.default_rng(7)
    truth = _similarity(1.7, 0.3, 20, -5)
    src = rng.uniform(0, 100, (40, 2))
    dst = transform_points(truth, src) + rng.normal(0, 0.5, (40, 2))
    found = estimate_similarity(src, dst)
    np.testing.assert_allclose(found[:, :2], truth[:, :2], atol=0.01)
    np.testing.assert_allclose(found[:, 2], truth[:, 2], atol=0.5)
    mirrored = src * np.array([-1, 1])  # a reflection is not a similarity: determinant stays positive
    assert np.linalg.det(estimate_similarity(src, mirrored)[:, :2]) > 0
    with pytest.raises(ValueError):
        estimate_similarity(np.zeros((5, 2)), np.ones((5, 2)))


def test_warp_puts_landmarks_on_the_template():
    truth = _similarity(2.5, 0.4, 100, 60)
    landmarks = transform_points(truth, ARCFACE_112.array())
    image = np.zeros((500, 500, 3), np.uint8)
    for x, y in landmarks:  # a bright dot at each landmark
        image[int(round(y)) - 2 : int(round(y)) + 3, int(round(x)) - 2 : int(round(x)) + 3] = 255
    crop = align_face(image, Detection(box=(0, 0, 1, 1), score=1, landmarks=landmarks), ARCFACE_112)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_112.points:
        assert crop[int(round(y)), int(round(x))].max() > 100


def test_missing_keypoints_give_a_clear_error():
    det = Detection(box=(0, 0, 10, 10), score=1, landmarks=np.zeros((5, 2)) + np.arange(5)[:, None])
    with pytest.raises(ValueError, match="needs dlib5 keypoints"):
        align_matrix(det, dlib_chip_template())
    with pytest.raises(ValueError, match="no landmarks"):
        align_matrix(Detection(box=(0, 0, 10, 10), score=1), AlignTemplate("t", ARCFACE_112.points, (112, 112)))


@pytest.mark.needs_data
def test_dlib_chip_matches_dlib_get_face_chip(pipeline):
    border = LFW / "lfw" / "Li_Ka-shing" / "Li_Ka-shing_0001.jpg"  # a face crossing the image edge
    for path in [CELEBA / "img_align_celeba" / "182638.jpg", PHOTOS / "group1.jpg", border]:
        image = load_image(path)
        det = pipeline.detect(image)[0]
        ours = pipeline.crops(image, [det])[0].astype(int)
        shape = dlib.full_object_detection(
            dlib.rectangle(0, 0, 1, 1), [dlib.point(int(x), int(y)) for x, y in det.keypoints]
        )
        theirs = dlib.get_face_chip(image, shape, size=150, padding=0.25).astype(int)
        assert np.array_equal(ours, theirs)  # pixel for pixel, pyramid (group photo) included
        template = pipeline.embedder.crop
        port = extract_dlib_chip(image, det.keypoints, template.array(), 150, native=False).astype(int)
        assert np.array_equal(port, theirs)  # the numpy port too
        # The chip matrix maps the keypoints onto dlib's template.
        template = pipeline.embedder.crop
        mapped = transform_points(align_matrix(det, template), det.keypoints)
        assert np.abs(mapped - template.array()).max() < 6


@pytest.mark.needs_data
def test_native_chip_sampling_equals_the_numpy_port_on_many_faces(pipeline):
    """extract_dlib_chip hands the sampling to dlib when it can: the same pixels as the
    numpy port, on CelebA crops, LFW images (faces at the border) and group photos."""
    template = pipeline.embedder.crop
    paths = sorted((CELEBA / "img_align_celeba").glob("*.jpg"))[::300]
    paths += [sorted(d.glob("*.jpg"))[0] for d in sorted((LFW / "lfw").iterdir())[::400] if d.is_dir()]
    paths += sorted(PHOTOS.glob("*.jpg"))
    faces = 0
    for path in paths:
        image = load_image(path)
        for det in pipeline.detect(image):
            native = extract_dlib_chip(image, det.keypoints, template.array(), 150, native=True)
            port = extract_dlib_chip(image, det.keypoints, template.array(), 150, native=False)
            assert native.dtype == np.uint8 and native.shape == (150, 150, 3)
            assert np.array_equal(native, port), path
            faces += 1
    assert faces >= 40


@pytest.mark.needs_data
def test_landmark_order_is_consistent_and_mirrors(pipeline):
    assert LANDMARK_NAMES == ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
    image = load_image(CELEBA / "img_align_celeba" / "000001.jpg")
    (face,) = pipeline.detect(image)
    le, re, nose, ml, mr = face.landmarks
    assert le[0] < re[0] and ml[0] < mr[0]
    assert max(le[1], re[1]) < nose[1] < min(ml[1], mr[1])
    # CelebA's own annotation of this aligned image, same order.
    official = np.array([(69, 109), (106, 113), (77, 142), (73, 152), (108, 154)], float)
    assert np.abs(face.landmarks[:2] - official[:2]).max() < 5  # eyes: measured
    assert np.abs(face.landmarks - official).max() < 12  # nose tip, mouth: estimated from dlib-5
    # On the mirror image, the left eye is where the right eye was, and so on.
    width = image.shape[1]
    (mirror,) = pipeline.detect(np.ascontiguousarray(image[:, ::-1]))
    flipped = np.array(face.landmarks)
    flipped[:, 0] = width - 1 - flipped[:, 0]
    np.testing.assert_allclose(mirror.landmarks[[1, 0, 2, 4, 3]], flipped, atol=4)
