"""dlib's ResNet as an ONNX graph (dlib-resnet-onnx): built in memory from the
.dat file, equal to dlib-resnet-torch and to dlib itself on real faces."""

from __future__ import annotations

import builtins
import os

import numpy as np
import pytest

from embedder.backends import dlib_dat as dd
from embedder.backends.base import BackendUnavailableError
from embedder.registry import available, create
from tests.conftest import CELEBA, LFW, PHOTOS

MODEL = dd.default_model_path()
pytestmark = pytest.mark.skipif(not os.path.isfile(MODEL), reason=f"model file missing: {MODEL}")


def test_registry_lists_the_onnx_embedder_and_builds_it_lazily():
    assert "dlib-resnet-onnx" in available("embedder")
    assert "dlib-resnet-torch" in available("embedder")  # still there
    embedder = create("embedder", "dlib-resnet-onnx", batch_size=4)
    assert embedder._model is None  # nothing loaded by the factory
    assert embedder.options() == {"batch_size": 4, "threads": None}
    assert embedder.crop.name == create("embedder", "dlib-resnet-torch").crop.name
    with pytest.raises(ValueError, match="batch_size"):
        create("embedder", "dlib-resnet-onnx", batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        create("embedder", "dlib-resnet-onnx", threads=0)


def _hide(monkeypatch, *names: str) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if name.split(".")[0] in names:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_onnxruntime_raises_a_clear_error(monkeypatch):
    _hide(monkeypatch, "onnxruntime")
    embedder = create("embedder", "dlib-resnet-onnx")
    with pytest.raises(BackendUnavailableError, match="pip install onnxruntime") as info:
        embedder.embed(np.zeros((1, 150, 150, 3), np.uint8))
    assert "dlib-resnet-torch" in str(info.value)


def test_missing_onnx_raises_a_clear_error(monkeypatch):
    _hide(monkeypatch, "onnx")
    embedder = create("embedder", "dlib-resnet-onnx")
    with pytest.raises(BackendUnavailableError, match="pip install onnx"):
        embedder.embed(np.zeros((1, 150, 150, 3), np.uint8))


def test_shapes_norms_and_batching():
    embedder = create("embedder", "dlib-resnet-onnx", batch_size=3)
    chips = np.random.default_rng(0).integers(0, 256, (7, 150, 150, 3), dtype=np.uint8)
    out = embedder.embed(chips)
    assert out.shape == (7, 128) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    whole = create("embedder", "dlib-resnet-onnx", batch_size=64).embed(chips)
    assert (out * whole).sum(1).min() >= 0.99999
    assert embedder.embed(np.zeros((0, 150, 150, 3), np.uint8)).shape == (0, 128)
    with pytest.raises(ValueError, match="150,150,3"):
        embedder.embed(np.zeros((1, 112, 112, 3), np.uint8))


def _real_crops() -> np.ndarray:
    from data.images import load_image
    from embedder.pipeline import FacePipeline

    pipeline = FacePipeline(embedder="dlib-resnet-torch")
    paths = sorted((CELEBA / "img_align_celeba").glob("*.jpg"))[::150]
    paths += [sorted(d.glob("*.jpg"))[0] for d in sorted((LFW / "lfw").iterdir())[::300] if d.is_dir()]
    paths += sorted(PHOTOS.glob("*.jpg"))[:2]
    crops = [pipeline.prepare(load_image(p))[1] for p in paths]
    crops = np.concatenate([c for c in crops if len(c)])
    assert len(crops) >= 40
    return crops


@pytest.mark.needs_data
def test_onnx_embeddings_equal_torch_and_dlib_on_real_faces():
    pytest.importorskip("torch")
    import dlib

    crops = _real_crops()
    got = create("embedder", "dlib-resnet-onnx").embed(crops).astype(np.float64)
    torch_vectors = create("embedder", "dlib-resnet-torch", device="cpu").embed(crops).astype(np.float64)
    cosine = (got * torch_vectors).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    assert cosine.min() >= 0.999999  # in practice float rounding only
    reference = dlib.face_recognition_model_v1(MODEL)
    few = crops[::8]
    expected = np.array([np.array(reference.compute_face_descriptor(np.ascontiguousarray(c))) for c in few])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert (expected * got[::8]).sum(axis=1).min() >= 0.9999


@pytest.mark.needs_data
def test_pipeline_with_the_onnx_embedder_records_its_backend():
    from data.images import load_image
    from embedder.pipeline import FacePipeline

    pipeline = FacePipeline(embedder="dlib-resnet-onnx")
    faces = pipeline(load_image(sorted((CELEBA / "img_align_celeba").glob("*.jpg"))[0]))
    assert len(faces) == 1 and faces[0].embedding.shape == (128,)
    resolved = pipeline.resolved_config()
    assert resolved.embedder == "dlib-resnet-onnx"
    assert resolved.embedder_options == {"batch_size": 32, "threads": None}
    assert pipeline.describe()["embedder"]["version"].startswith("onnxruntime ")


@pytest.mark.needs_data
def test_a_gallery_built_with_the_old_default_keeps_its_embedder(tmp_path):
    """Galleries record their resolved pipeline: one built with dlib-resnet-torch (the
    default before dlib-resnet-onnx) is searched, added to and resumed with torch."""
    pytest.importorskip("torch")
    from data.images import load_image
    from embedder.pipeline import PipelineConfig
    from indexer import RunConfig, run_index
    from search import Searcher

    old = PipelineConfig(embedder="dlib-resnet-torch")
    config = RunConfig(dataset_root=str(CELEBA), format="celeba", split="test", limit=8, partition_size=8, pipeline=old)
    run_index(config, tmp_path / "g", workers=0, progress=False)
    searcher = Searcher(str(tmp_path / "g"))
    assert searcher.pipeline.embedder.name == "dlib-resnet-torch"
    assert searcher.gallery.info.pipeline_config["embedder"] == "dlib-resnet-torch"
    query = load_image(sorted((CELEBA / "img_align_celeba").glob("18*.jpg"))[0])
    (result,) = searcher.search(query, k=1)
    assert result.matches[0].cosine > 0.99999  # the same image is in the gallery: same embedder, same vector


def test_resuming_a_run_started_with_the_old_default_names_its_embedder(tmp_path):
    from embedder.pipeline import PipelineConfig
    from indexer.config import ConfigMismatchError, RunConfig, check_or_write_run_config

    old = RunConfig(dataset_root=str(tmp_path), format="folder", pipeline=PipelineConfig(embedder="dlib-resnet-torch"))
    assert check_or_write_run_config(tmp_path / "g", old) is False
    assert check_or_write_run_config(tmp_path / "g", old) is True
    new = RunConfig(dataset_root=str(tmp_path), format="folder")
    with pytest.raises(ConfigMismatchError, match="started with --embedder dlib-resnet-torch"):
        check_or_write_run_config(tmp_path / "g", new)


def test_onnxruntime_telemetry_is_off_and_leaves_no_file(tmp_path):
    """onnxruntime's Linux wheels write a session file into TMPDIR on import (1DS
    telemetry) unless ORT_DISABLE_TELEMETRY=1; the backend sets it before importing."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import os, numpy as np; from embedder.pipeline import FacePipeline; "
            "FacePipeline().embedder.embed(np.zeros((1, 150, 150, 3), np.uint8)); "
            "print(os.environ['ORT_DISABLE_TELEMETRY'])")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "1"
    assert list(tmp_path.iterdir()) == []
