"""dlib's ``dlib_face_recognition_resnet_model_v1`` as a torch module, with its
weights read from dlib's own ``.dat`` file by :mod:`embedder.backends.dlib_dat`
(whose docstring gives the network's type and the file format). Needs torch;
the ``dlib-resnet-torch`` backend imports this module only when it loads.

Layer semantics that matter for bit-faithful inference (``dlib/dnn/layers.h``,
``dlib/dnn/input.h``, ``dlib/dnn/cpu_dlib.cpp``/``tensor_tools.h``):

* ``input_rgb_image_sized<150>``: ``(pixel - avg) / 256`` per channel with
  avg = (122.782, 117.001, 104.298) (stored in the file too), RGB planes.
* ``con_``/``max_pool_``/``avg_pool_``: default padding is ``nr/2`` when the
  stride is 1 and **0 otherwise**; output size ``1 + (n + 2p - k) // s``.
  ``con_`` params = filters (N,K,R,C) followed by N biases; it is a
  cross-correlation like torch's conv2d.  Pooling windows start at
  ``out*stride - padding`` (``centered_rect`` with offset ``k/2 - padding``)
  and are clipped to the image: max ignores, and avg divides by the count of,
  in-bounds pixels only (torch's ``count_include_pad=False``).  Every
  strided layer in this net has padding 0, so no window is ever clipped and
  torch's floor-mode pooling matches exactly.
* ``affine_`` (conv mode): ``x * gamma[k] + beta[k]``; params = gamma then beta.
* ``add_prev_``: the output has, per dimension, the *larger* of the two input
  sizes, and ``tt::add`` treats elements outside either input as zero.  In
  the down-sampling blocks this zero-pads the channels of the pooled skip path
  (e.g. 32 -> 64), and where the strided 3x3 conv (padding 0) is one pixel
  smaller than the 2x2/2 average pool of the skip path (8x8 -> conv 3x3,
  pool 4x4; 4x4 -> conv 1x1, pool 2x2) the conv path is zero-padded at the
  bottom/right.
* ``avg_pool_everything`` = global mean; ``fc_`` weights are stored
  (num_inputs, num_outputs) row-major, output = x @ W; ``loss_metric_`` returns
  the fc output unnormalised.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedder.backends.dlib_dat import BLOCKS, CHIP_SIZE, DLIB_RGB_MEAN, DlibModelFormatError, read_dlib_resnet


def dlib_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev_``: sum over the larger shape, zero outside either input."""
    if a.shape == b.shape:
        return a + b
    c = max(a.shape[1], b.shape[1])
    h = max(a.shape[2], b.shape[2])
    w = max(a.shape[3], b.shape[3])

    def grow(t: torch.Tensor) -> torch.Tensor:
        if t.shape[1:] == (c, h, w):
            return t
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class Affine(nn.Module):
    """dlib's ``affine_`` in conv mode: per-channel ``x * weight + bias``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class ConvAffine(nn.Module):
    """``affine<con<...>>``: a biased conv (dlib padding rule) followed by affine_."""

    def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        padding = k // 2 if stride == 1 else 0  # dlib: _padding = _stride!=1 ? 0 : _nr/2
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=True)
        self.affine = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(self.conv(x))


class Residual(nn.Module):
    """``ares<N>`` / ``ares_down<N>``."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.unit1 = ConvAffine(cin, cout, 3, 2 if down else 1)
        self.unit2 = ConvAffine(cout, cout, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unit2(F.relu(self.unit1(x)))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x  # avg_pool<2,2,2,2>, padding 0
        return F.relu(dlib_add(y, skip))


class DlibResNet(nn.Module):
    """dlib_face_recognition_resnet_model_v1: 150x150 RGB chip -> 128-D (unnormalised)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.tensor(DLIB_RGB_MEAN, dtype=torch.float32))
        self.stem = ConvAffine(3, 32, 7, 2)
        blocks = []
        cin = 32
        for cout, down in BLOCKS:
            blocks.append(Residual(cin, cout, down))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float (N,3,150,150) already prepared by :meth:`prepare`."""
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)  # max_pool<3,3,2,2>, padding 0
        x = self.blocks(x)
        x = x.mean(dim=(2, 3))  # avg_pool_everything
        return self.fc(x)

    def prepare(self, chips: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB chips (N,150,150,3) or one (150,150,3) -> (N,3,150,150) float, as
        ``input_rgb_image_sized<150>::to_tensor``: ``(pixel - avg) / 256``."""
        if isinstance(chips, (list, tuple)):
            chips = np.stack([np.asarray(c) for c in chips])
        t = torch.as_tensor(chips)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[-1] != 3 or t.shape[1] != CHIP_SIZE or t.shape[2] != CHIP_SIZE:
            raise ValueError(f"expected RGB chips of shape (N,{CHIP_SIZE},{CHIP_SIZE},3), got {tuple(t.shape)}")
        t = t.to(device=self.input_mean.device, dtype=torch.float32).permute(0, 3, 1, 2)
        return ((t - self.input_mean.view(1, 3, 1, 1)) / 256.0).contiguous()

    @torch.inference_mode()
    def embed(self, chips: np.ndarray | Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Raw 128-D descriptors (float32, as dlib's, not normalised) of 150x150 RGB chips."""
        x = self.prepare(chips)
        fmt = torch.channels_last if self.stem.conv.weight.is_contiguous(memory_format=torch.channels_last) \
            and not self.stem.conv.weight.is_contiguous() else torch.contiguous_format
        outs = [self(x[i : i + batch_size].contiguous(memory_format=fmt)) for i in range(0, x.shape[0], batch_size)]
        return torch.cat(outs).float().cpu().numpy()


def load_dlib_resnet(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> DlibResNet:
    """A :class:`DlibResNet` with the weights of dlib's .dat file, in eval mode.

    ``channels_last`` stores the conv weights NHWC (faster on CPU for batches;
    :meth:`DlibResNet.embed` then feeds NHWC input too). Same results."""
    arrays = read_dlib_resnet(path)
    model = DlibResNet()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    expected = model.state_dict()
    missing = set(expected) - set(state)
    extra = set(state) - set(expected)
    if missing or extra:
        raise DlibModelFormatError(f"weights do not fit DlibResNet: missing {sorted(missing)}, extra {sorted(extra)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise DlibModelFormatError(f"{k}: file has shape {tuple(v.shape)}, module expects {tuple(expected[k].shape)}")
    model.load_state_dict(state)
    model.requires_grad_(False)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


__all__ = [
    "DlibResNet",
    "dlib_add",
    "load_dlib_resnet",
]
