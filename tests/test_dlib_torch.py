"""The torch port of dlib's face recognition ResNet: the parser reads dlib's own
.dat file, and the torch embedding equals dlib's on real faces."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from embedder.backends import dlib_dat as dd
from tests.conftest import CELEBA, LFW

MODEL = dd.default_model_path()
pytestmark = pytest.mark.skipif(not os.path.isfile(MODEL), reason=f"model file missing: {MODEL}")


@pytest.fixture(scope="module")
def net() -> dd.DlibNet:
    return dd.read_dlib_resnet_layers(MODEL)


def test_parser_reads_the_layer_structure(net):
    assert net.loss["version"] == "loss_metric_2"
    assert net.input["nr"] == net.input["nc"] == 150
    np.testing.assert_allclose(net.input["avg_rgb"], dd.DLIB_RGB_MEAN, atol=1e-4)
    kinds = Counter(layer.kind for layer in net.layers)
    assert kinds == {"con": 29, "affine": 29, "relu": 29, "add_prev": 14, "avg_pool": 5, "max_pool": 1, "fc": 1}
    assert len(net.layers) == 108
    # Parameters come input-first: the 7x7 stem conv, its affine, relu, max pool ... fc last.
    assert [layer.kind for layer in net.layers[:4]] == ["con", "affine", "relu", "max_pool"]
    assert net.layers[-1].kind == "fc" and net.layers[-2].kind == "avg_pool"
    convs = [layer for layer in net.layers if layer.kind == "con"]
    assert convs[0].params["weight"].shape == (32, 3, 7, 7)
    assert convs[0].attrs["stride"] == (2, 2) and convs[0].attrs["padding"] == (0, 0)
    assert convs[-1].params["weight"].shape == (256, 256, 3, 3)
    strided = [c for c in convs[1:] if c.attrs["stride"] == (2, 2)]
    assert [c.params["weight"].shape[:2] for c in strided] == [(64, 32), (128, 64), (256, 128), (256, 256)]
    assert all(c.attrs["padding"] == (0, 0) for c in strided)
    assert net.layers[-1].params["weight"].shape == (256, 128)  # fc_no_bias: (num_inputs, num_outputs)
    assert "bias" not in net.layers[-1].params


def test_primitive_decoders_on_the_files_own_bytes():
    with open(MODEL, "rb") as fh:
        head = fh.read(64)
    r = dd._Reader(head)
    assert r.read_int() == 1  # add_loss_layer version
    assert r.read_string() == "loss_metric_2"
    # margin and dist_thresh as float_details: 0xa3d70a * 2**-28 and 0x99999a * 2**-24
    assert r.read_float() == np.float32(0.04)
    assert r.read_float() == np.float32(0.6)
    r = dd._Reader(bytes([0x01, 0x00, 0x81, 0x05, 0x02, 0x2C, 0x01, 0x31, 0x30]))
    assert (r.read_int(), r.read_int(), r.read_int(), r.read_bool(), r.read_bool()) == (0, -5, 300, True, False)
    # an old (version 1) tensor of portable floats: 1x2x1x1 holding [0.04, -0.6]
    v1 = bytes([0x01, 0x01, 0x01, 0x01, 0x01, 0x02, 0x01, 0x01, 0x01, 0x01])
    v1 += bytes([0x03, 0x0A, 0xD7, 0xA3, 0x81, 0x1C]) + bytes([0x83, 0x9A, 0x99, 0x99, 0x81, 0x18])
    np.testing.assert_array_equal(dd._Reader(v1).read_tensor(), np.array([0.04, -0.6], np.float32).reshape(1, 2, 1, 1))
    with pytest.raises(dd.DlibModelFormatError):
        dd._Reader(bytes([0x75])).read_int()


def test_read_dlib_resnet_names_the_parsed_layers(net):
    cold = dd.read_dlib_resnet(MODEL)
    convs = [layer for layer in net.layers if layer.kind == "con"]
    np.testing.assert_array_equal(cold["stem.conv.weight"], convs[0].params["weight"])
    np.testing.assert_array_equal(cold["blocks.13.unit2.conv.bias"], convs[-1].params["bias"])
    assert cold["stem.conv.weight"].shape == (32, 3, 7, 7)
    assert cold["fc.weight"].shape == (128, 256)
    assert sum(a.size for a in cold.values() if a is not cold["input_mean"]) == 5_614_592
    assert all(a.dtype == np.float32 for a in cold.values())


def test_not_a_model_file_raises_clearly(tmp_path):
    truncated = tmp_path / "truncated.dat"
    with open(MODEL, "rb") as fh:
        truncated.write_bytes(fh.read(100_000))
    with pytest.raises(dd.DlibModelFormatError, match="not a dlib serialisation") as info:
        dd.read_dlib_resnet(truncated)
    assert info.value.__cause__ is not None
    with pytest.raises(FileNotFoundError, match="cannot read dlib model file"):
        dd.read_dlib_resnet(tmp_path / "absent.dat")
    other = os.path.join(os.path.dirname(MODEL), "shape_predictor_5_face_landmarks.dat")
    with pytest.raises(dd.DlibModelFormatError):
        dd.read_dlib_resnet(other)


def _real_chips(n_celeba: int, n_lfw: int) -> np.ndarray:
    import dlib

    from data.images import load_image

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(os.path.join(os.path.dirname(MODEL), "shape_predictor_5_face_landmarks.dat"))
    celeba = sorted((CELEBA / "img_align_celeba").glob("*.jpg"))[::97]
    lfw = [sorted(d.glob("*.jpg"))[0] for d in sorted((LFW / "lfw").iterdir())[::211] if d.is_dir()]
    chips = []
    for paths, n in ((celeba, n_celeba), (lfw, n_lfw)):
        found = 0
        for path in paths:
            image = load_image(path)
            faces = detector(image, 1)
            if not faces:
                continue
            face = max(faces, key=lambda r: r.area())
            chips.append(dlib.get_face_chip(image, predictor(image, face), size=150, padding=0.25))
            found += 1
            if found == n:
                break
        assert found == n, f"only {found} faces found"
    return np.stack(chips)


@pytest.mark.needs_data
def test_torch_embedding_equals_dlib_on_real_faces():
    torch = pytest.importorskip("torch")
    import dlib

    from embedder.backends.dlib_torch import load_dlib_resnet

    torch.set_num_threads(2)
    chips = _real_chips(5, 5)
    reference = dlib.face_recognition_model_v1(MODEL)
    expected = np.array([np.array(reference.compute_face_descriptor(chip)) for chip in chips])
    model = load_dlib_resnet(MODEL)
    assert not model.training
    got = model.embed(chips, batch_size=5).astype(np.float64)
    assert got.shape == (10, 128)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    cosine = (expected * got).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine


def test_add_prev_zero_pads_like_dlib():
    torch = pytest.importorskip("torch")
    from embedder.backends.dlib_torch import dlib_add

    a = torch.ones(1, 4, 3, 3)
    b = torch.full((1, 2, 4, 4), 2.0)
    out = dlib_add(a, b)
    assert out.shape == (1, 4, 4, 4)
    assert out[0, :2, :3, :3].eq(3).all() and out[0, 2:, :3, :3].eq(1).all()
    assert out[0, :2, 3, :].eq(2).all() and out[0, 2:, 3, :].eq(0).all()
