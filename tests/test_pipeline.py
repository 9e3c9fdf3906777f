"""The pipeline's registry, laziness, empty inputs and batching."""

from __future__ import annotations

import numpy as np
import pytest

from data.images import load_image
from embedder import FacePipeline, UnknownBackendError, available, create, register
from tests.conftest import CELEBA, LFW, PHOTOS


def test_registry_lists_and_rejects_names():
    assert {"dlib-hog", "dlib-cnn"} <= set(available("detector"))
    assert {"dlib-5", "dlib-68"} <= set(available("landmarks"))
    assert "dlib-resnet" in available("embedder")
    with pytest.raises(UnknownBackendError, match="unknown embedder backend 'facenet'; available: .*dlib-resnet"):
        create("embedder", "facenet")


def _loaded(backend) -> bool:  # noqa: ANN001
    return backend._model is not None or getattr(backend._local, "model", None) is not None


def test_models_load_lazily():
    pipeline = FacePipeline()
    assert not _loaded(pipeline.detector) and not _loaded(pipeline.landmarker) and not _loaded(pipeline.embedder)
    assert pipeline.describe()["embedder"]["dim"] == 128  # describing loads nothing either
    assert not _loaded(pipeline.embedder)
    pipeline(np.zeros((64, 64, 3), np.uint8))
    assert _loaded(pipeline.detector)


def test_dlib_models_are_per_thread_and_threads_agree():
    """dlib objects are not thread-safe: each thread gets its own, and concurrent answers equal serial ones."""
    from concurrent.futures import ThreadPoolExecutor

    from data.images import load_image
    from tests.conftest import PHOTOS

    pipeline = FacePipeline()
    images = [load_image(PHOTOS / f"group{i}.jpg") for i in (1, 2, 3)]
    serial = [[f.embedding for f in pipeline(im)] for im in images]
    import threading

    barrier = threading.Barrier(3)  # three tasks on three threads at once

    def model_id(_: int) -> int:
        barrier.wait(timeout=30)
        return id(pipeline.detector._get())

    with ThreadPoolExecutor(3) as pool:
        models = set(pool.map(model_id, range(3)))
        parallel = list(pool.map(pipeline, images * 2))
    assert len(models) == 3 and id(pipeline.detector._get()) not in models
    for got, want in zip(parallel, serial * 2):
        assert len(got) == len(want)
        for face, emb in zip(got, want):
            assert float(face.embedding @ emb) > 0.99999


def test_empty_in_empty_out():
    pipeline = FacePipeline()
    assert pipeline(np.zeros((100, 100, 3), np.uint8)) == []
    assert pipeline.batch([]) == []
    assert pipeline.embed_crops(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)
    assert pipeline.detect(np.zeros((0, 0, 3), np.uint8)) == []


def test_embed_groups_embeds_once_and_gives_each_image_its_rows():
    pipeline = FacePipeline()
    crops = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
    groups = pipeline.embed_groups([crops[:2], crops[:0], crops[2:]])
    assert [g.shape for g in groups] == [(2, 128), (0, 128), (1, 128)]
    np.testing.assert_array_equal(np.concatenate(groups), pipeline.embed_crops(crops))
    assert [g.shape for g in pipeline.embed_groups([crops[:0]])] == [(0, 128)]


def test_mismatched_landmarks_are_refused():
    @register("landmarks", "test-canonical-only")
    class CanonicalOnly:  # gives LANDMARK_NAMES points but no dlib-5 keypoints
        name = "test-canonical-only"
        scheme = None

    with pytest.raises(ValueError, match="aligns on dlib5 keypoints"):
        FacePipeline(landmarks="test-canonical-only")
    # dlib-68 gives dlib5-compatible keypoints, so it pairs with dlib-resnet.
    assert FacePipeline(landmarks="dlib-68").embedder.crop.scheme == "dlib5"


@pytest.mark.needs_data
def test_batch_equals_single_and_flip_differs():
    pipeline = FacePipeline()
    images = [load_image(CELEBA / "img_align_celeba" / n) for n in ("182638.jpg", "182639.jpg")]
    images.append(load_image(PHOTOS / "group1.jpg"))
    batched = pipeline.batch(images)
    assert [len(f) for f in batched][:2] == [1, 1] and len(batched[2]) >= 3
    for image, faces in zip(images, batched):
        single = pipeline(image)
        for a, b in zip(single, faces):
            np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)
            assert a.box == b.box
    flipped = FacePipeline(flip=True)(images[0])[0].embedding
    plain = batched[0][0].embedding
    assert abs(np.linalg.norm(flipped) - 1) < 1e-5
    assert 0.9 < float(flipped @ plain) < 0.99999


@pytest.mark.needs_data
def test_plain_functions():
    from embedder import cosine_similarity, face_embeddings, face_landmarks, face_locations

    blank = np.zeros((80, 80, 3), np.uint8)
    assert face_locations(blank) == [] and face_landmarks(blank) == []
    assert face_embeddings(blank).shape == (0, 128)
    assert cosine_similarity(np.zeros((0, 128)), np.ones(128)).shape == (0,)
    group = load_image(PHOTOS / "group1.jpg")
    boxes = face_locations(group)
    vectors = face_embeddings(group)
    assert len(boxes) == len(vectors) == len(face_landmarks(group)) >= 3
    sims = cosine_similarity(vectors, vectors[0])
    assert sims.argmax() == 0 and abs(sims[0] - 1) < 1e-5


@pytest.mark.needs_data
def test_dlib68_measures_what_dlib5_estimates():
    image = load_image(CELEBA / "img_align_celeba" / "000001.jpg")
    official = np.array([(69, 109), (106, 113), (77, 142), (73, 152), (108, 154)], float)
    (face68,) = FacePipeline(landmarks="dlib-68").detect(image)
    (face5,) = FacePipeline().detect(image)
    assert np.abs(face68.landmarks - official).max() < 6
    assert np.abs(face68.landmarks - face5.landmarks).max() < 12
    assert np.abs(face68.keypoints - face5.keypoints).max() < 6  # dlib-5-compatible chip points


@pytest.mark.needs_data
@pytest.mark.parametrize("embedder", ["dlib-resnet-onnx", "dlib-resnet-torch"])
def test_exact_embedders_equal_dlibs_own(embedder):
    """The exact ONNX Runtime pipeline, the torch one and dlib's own embedder agree
    on real faces, border-crossing and group-photo faces included."""
    ours_pipeline = FacePipeline(embedder=embedder)
    if embedder == "dlib-resnet-onnx":
        assert not ours_pipeline.embeds_in_batches
    else:
        assert ours_pipeline.embeds_in_batches
    dlib_pipeline = FacePipeline(embedder="dlib-resnet")
    paths = [CELEBA / "img_align_celeba" / n for n in ("000001.jpg", "182638.jpg", "182639.jpg")]
    paths += [LFW / "lfw" / "Li_Ka-shing" / "Li_Ka-shing_0001.jpg", PHOTOS / "group1.jpg"]
    count = 0
    for path in paths:
        image = load_image(path)
        ours, theirs = ours_pipeline(image), dlib_pipeline(image)
        assert len(ours) == len(theirs) >= 1
        for a, b in zip(ours, theirs):
            assert float(a.embedding @ b.embedding) >= 0.9999
            count += 1
    assert count >= 7


@pytest.mark.needs_data
def test_adaptive_upsampling_finds_small_faces_and_keeps_old_galleries_working():
    import cv2

    from embedder import create

    face = load_image(CELEBA / "img_align_celeba" / "182638.jpg")
    small = cv2.resize(face, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)  # face under the 80 px window
    canvas = np.full((300, 300, 3), 128, np.uint8)
    canvas[100 : 100 + small.shape[0], 100 : 100 + small.shape[1]] = small
    assert create("detector", "dlib-hog", upsample=0).detect(canvas) == []
    (found,) = create("detector", "dlib-hog").detect(canvas)  # the default: adaptive
    assert 100 <= found.box[0] < found.box[2] <= 100 + small.shape[1]
    # Large faces are found on the first, cheap pass, at the same place as always-small finds them.
    (cheap,) = create("detector", "dlib-hog").detect(face)
    (upsampled,) = create("detector", "dlib-hog", upsample="always-small").detect(face)
    assert np.abs(np.array(cheap.box) - np.array(upsampled.box)).max() < 15
    # Galleries built before "adaptive" stored upsample="auto": it still means always-small.
    assert create("detector", "dlib-hog", upsample="auto").upsample == "always-small"
    with pytest.raises(ValueError, match="upsample must be"):
        create("detector", "dlib-hog", upsample="sometimes")
