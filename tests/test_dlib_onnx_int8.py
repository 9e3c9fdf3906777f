"""dlib's ResNet quantised to int8 (dlib-resnet-onnx-int8): a named backend beside
the exact one, quantised in memory from shipped activation ranges, close to but not
equal to the float graph on real faces."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from embedder.backends import dlib_dat as dd
from embedder.backends import dlib_onnx
from embedder.backends.base import BackendUnavailableError
from embedder.registry import available, create
from tests.conftest import CELEBA, LFW

MODEL = dd.default_model_path()
pytestmark = pytest.mark.skipif(not os.path.isfile(MODEL), reason=f"model file missing: {MODEL}")
needs_int8 = pytest.mark.skipif(not dlib_onnx.int8_supported(), reason="onnxruntime < 1.32")


def test_the_int8_backend_is_named_beside_the_exact_one():
    assert {"dlib-resnet-onnx", "dlib-resnet-onnx-int8"} <= set(available("embedder"))
    embedder = create("embedder", "dlib-resnet-onnx-int8", batch_size=8)
    assert embedder._model is None  # nothing built by the factory
    assert embedder.options() == {"batch_size": 8, "threads": None}
    assert embedder.crop.name == create("embedder", "dlib-resnet-onnx").crop.name


def test_old_onnxruntime_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(dlib_onnx, "int8_supported", lambda: False)
    with pytest.raises(BackendUnavailableError, match="onnxruntime >= 1.32") as info:
        create("embedder", "dlib-resnet-onnx-int8").embed(np.zeros((1, 150, 150, 3), np.uint8))
    assert "dlib-resnet-onnx" in str(info.value)


def test_unreadable_ranges_give_a_clear_error(monkeypatch, tmp_path):
    broken = tmp_path / "ranges.json"
    broken.write_text("{not json")
    monkeypatch.setattr(dlib_onnx, "INT8_RANGES", str(broken))
    with pytest.raises(BackendUnavailableError, match="activation ranges"):
        create("embedder", "dlib-resnet-onnx-int8").embed(np.zeros((1, 150, 150, 3), np.uint8))


@needs_int8
def test_folding_the_affine_layers_keeps_the_float_embeddings():
    import onnxruntime

    chips = np.random.default_rng(1).integers(0, 256, (6, 150, 150, 3), dtype=np.uint8)
    plain = onnxruntime.InferenceSession(dlib_onnx.build_dlib_resnet_onnx(), providers=["CPUExecutionProvider"])
    folded = onnxruntime.InferenceSession(dlib_onnx.build_dlib_resnet_onnx(fold_affine=True),
                                          providers=["CPUExecutionProvider"])
    a, b = (s.run(None, {"chips": chips})[0].astype(np.float64) for s in (plain, folded))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    assert (a * b).sum(1).min() >= 0.99999


@needs_int8
def test_the_shipped_ranges_cover_the_graph_the_calibration_measures():
    """The shipped file names exactly the tensors a calibration of today's graph
    measures: a change to the graph that renames them fails here, not in a user's run."""
    shipped = json.loads(open(dlib_onnx.INT8_RANGES, encoding="utf-8").read())
    chips = np.random.default_rng(2).integers(0, 256, (4, 150, 150, 3), dtype=np.uint8)
    measured = dlib_onnx.calibrate_int8_ranges(chips)
    assert set(shipped["ranges"]) == set(measured)
    assert all(lo <= hi for lo, hi in shipped["ranges"].values())
    assert shipped["calibration"]["chips"] >= 256


def _real_crops() -> np.ndarray:
    from data.images import load_image
    from embedder.pipeline import FacePipeline

    pipeline = FacePipeline()
    paths = sorted((CELEBA / "img_align_celeba").glob("*.jpg"))[100::120]
    paths += [sorted(d.glob("*.jpg"))[0] for d in sorted((LFW / "lfw").iterdir())[::250] if d.is_dir()]
    crops = np.concatenate([c for c in (pipeline.prepare(load_image(p))[1] for p in paths) if len(c)])
    assert len(crops) >= 40
    return crops


@needs_int8
@pytest.mark.needs_data
def test_int8_is_quantised_close_to_float_and_leaves_logging_alone():
    import onnx

    root = logging.getLogger()
    handlers, filters = list(root.handlers), list(root.filters)
    crops = _real_crops()
    exact = create("embedder", "dlib-resnet-onnx").embed(crops).astype(np.float64)
    int8 = create("embedder", "dlib-resnet-onnx-int8")
    got = int8.embed(crops).astype(np.float64)
    assert (root.handlers, root.filters) == (handlers, filters)  # the quantiser's advice left no trace
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = (got * exact).sum(axis=1)
    assert cosine.min() >= 0.998, cosine.min()  # close ...
    assert cosine.max() < 0.999999  # ... and really quantised, not the float graph
    graph = onnx.load_from_string(dlib_onnx.build_dlib_resnet_onnx_int8(
        {k: tuple(v) for k, v in json.loads(open(dlib_onnx.INT8_RANGES).read())["ranges"].items()}))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("Conv") == 29 and ops.count("QuantizeLinear") >= 29
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == 29
    # the same faces match themselves across the two: nearest neighbour of each int8 vector is its float one
    assert (np.argmax(got @ exact.T, axis=1) == np.arange(len(got))).all()
    assert "int8" in int8.version()
