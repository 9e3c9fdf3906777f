"""dlib's ResNet quantised to int8 (dlib-resnet-onnx-int8): a named backend beside
the exact one, quantised in memory from shipped activation ranges, close to but not
equal to the float graph on real faces."""

from __future__ import annotations

import json
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
needs_calibration = pytest.mark.skipif(not dlib_onnx.int8_supported(), reason="calibration needs onnxruntime >= 1.32")


def test_the_int8_backend_is_named_beside_the_exact_one():
    assert {"dlib-resnet-onnx", "dlib-resnet-onnx-int8"} <= set(available("embedder"))
    embedder = create("embedder", "dlib-resnet-onnx-int8", batch_size=8)
    assert embedder._model is None  # nothing built by the factory
    assert embedder.options() == {"batch_size": 8, "threads": None}
    assert embedder.crop.name == create("embedder", "dlib-resnet-onnx").crop.name


def test_ranges_that_miss_a_tensor_give_a_clear_error(monkeypatch, tmp_path):
    shipped = json.loads(open(dlib_onnx.INT8_RANGES, encoding="utf-8").read())
    shipped["ranges"].pop(next(name for name in sorted(shipped["ranges"]) if name.startswith("relu_")))
    partial = tmp_path / "ranges.json"
    partial.write_text(json.dumps(shipped))
    monkeypatch.setattr(dlib_onnx, "INT8_RANGES", str(partial))
    with pytest.raises(BackendUnavailableError, match="no calibrated range for tensor") as info:
        create("embedder", "dlib-resnet-onnx-int8").embed(np.zeros((1, 150, 150, 3), np.uint8))
    assert "calibrate_int8.py" in str(info.value) and "dlib-resnet-onnx" in str(info.value)


def test_unreadable_ranges_give_a_clear_error(monkeypatch, tmp_path):
    broken = tmp_path / "ranges.json"
    broken.write_text("{not json")
    monkeypatch.setattr(dlib_onnx, "INT8_RANGES", str(broken))
    with pytest.raises(BackendUnavailableError, match="activation ranges"):
        create("embedder", "dlib-resnet-onnx-int8").embed(np.zeros((1, 150, 150, 3), np.uint8))


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


@needs_calibration
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


@pytest.mark.needs_data
def test_int8_is_quantised_close_to_float_on_real_faces():
    crops = _real_crops()
    exact = create("embedder", "dlib-resnet-onnx").embed(crops).astype(np.float64)
    int8 = create("embedder", "dlib-resnet-onnx-int8")
    got = int8.embed(crops).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = (got * exact).sum(axis=1)
    assert cosine.min() >= 0.998, cosine.min()  # close ...
    assert cosine.max() < 0.999999  # ... and really quantised, not the float graph
    # the same faces match themselves across the two: nearest neighbour of each int8 vector is its float one
    assert (np.argmax(got @ exact.T, axis=1) == np.arange(len(got))).all()
    assert "int8" in int8.version()


def test_onnx_runtime_runs_every_convolution_as_an_integer_one(tmp_path):
    """The graph is written so that ONNX Runtime fuses each DequantizeLinear -> Conv ->
    QuantizeLinear into QLinearConv (and the additions into QLinearAdd): what makes it fast."""
    import onnx
    import onnxruntime

    ranges = {k: tuple(v) for k, v in json.loads(open(dlib_onnx.INT8_RANGES).read())["ranges"].items()}
    graph = onnx.load_from_string(dlib_onnx.build_dlib_resnet_onnx_int8(ranges))
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == 29
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 29 and "Conv" not in ops
    assert ops.count("QLinearAdd") == 14 and "Relu" not in ops


@needs_calibration
def test_the_written_graph_computes_what_onnx_runtimes_quantiser_makes(tmp_path):
    """The int8 graph is written directly (fast, no quantisation tool at load), and
    computes exactly what ONNX Runtime's own quantize_static makes of the folded graph
    with the same ranges and settings."""
    import onnxruntime
    from onnxruntime import quantization as q

    ranges = {k: tuple(v) for k, v in json.loads(open(dlib_onnx.INT8_RANGES).read())["ranges"].items()}
    (tmp_path / "float.onnx").write_bytes(dlib_onnx.build_dlib_resnet_onnx(fold_affine=True))
    data = {k: q.TensorData(lowest=np.array([lo], np.float32), highest=np.array([hi], np.float32))
            for k, (lo, hi) in ranges.items()}
    q.save_tensors_data(q.TensorsData(q.CalibrationMethod.MinMax, data), tmp_path / "ranges.json")
    with dlib_onnx._quiet_quantizer():
        q.quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "ort.onnx"), None,
                          calibration_cache_path=str(tmp_path / "ranges.json"), **dlib_onnx._quantize_options())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    ours = onnxruntime.InferenceSession(dlib_onnx.build_dlib_resnet_onnx_int8(ranges), options,
                                        providers=["CPUExecutionProvider"])
    theirs = onnxruntime.InferenceSession(str(tmp_path / "ort.onnx"), options, providers=["CPUExecutionProvider"])
    chips = np.random.default_rng(3).integers(0, 256, (8, 150, 150, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ours.run(None, {"chips": chips})[0], theirs.run(None, {"chips": chips})[0])
