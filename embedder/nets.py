"""The trainable networks (timm backbones) and their checkpoints.

A checkpoint carries everything a backend needs to use the weights: the
architecture name, the crop size, the alignment template (embedder) or crop
margin (landmarks), and the input normalisation. Training heads (ArcFace)
live in ``training/``, beside the model, and are not part of it.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.errors import BackendError

CHECKPOINT_FORMAT = "facesearch-checkpoint"
CHECKPOINT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointError(BackendError, ValueError):
    """A file that is not a usable facesearch checkpoint, and why."""


@dataclass(frozen=True)
class Preprocess:
    """How a network's input is made from an image: travels with the weights."""

    crop_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN  # of RGB values scaled to 0..1
    std: tuple[float, float, float] = IMAGENET_STD
    template: tuple[tuple[float, float], ...] | None = None  # embedder: 5 points in the crop, canonical order
    template_name: str | None = None
    margin: float | None = None  # landmarks: the square crop around the box, grown by this share per side

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocess":
        template = data.get("template")
        return cls(
            crop_size=int(data["crop_size"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
            template=tuple(tuple(p) for p in template) if template is not None else None,
            template_name=data.get("template_name"), margin=data.get("margin"),
        )

    def normalise(self, crops: np.ndarray):  # noqa: ANN201 - returns a torch tensor
        """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float tensor."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(crops)).float().div_(255.0).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class Checkpoint:
    kind: str  # "landmarks" or "embedder"
    arch: str
    preprocess: Preprocess
    state_dict: dict[str, Any]
    embedding_dim: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # training settings and figures


def _timm():
    try:
        import timm
    except ImportError as err:
        raise CheckpointError("the trainable models need timm: pip install 'facesearch[train]'") from err
    return timm


def create_backbone(arch: str, num_classes: int, pretrained: bool = False, init: str | None = None):  # noqa: ANN201
    """A timm model by name. ``pretrained`` fetches timm's hub weights (needs the
    network); ``init`` loads local weights (a timm/torch state dict)."""
    import torch

    timm = _timm()
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise CheckpointError(f"unknown timm architecture {arch!r}, e.g. resnet18, mobilenetv3_small_100") from err
        raise
    except Exception as err:  # noqa: BLE001 - hub download errors come in many types
        if pretrained:
            raise CheckpointError(
                f"--pretrained could not fetch timm's weights for {arch} ({type(err).__name__}: {err}); "
                "offline, give local weights with --init PATH, or train from scratch"
            ) from err
        raise
    if init is not None:
        if not Path(init).is_file():
            raise CheckpointError(f"--init {init}: no such file")
        state = torch.load(init, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            state = {k.removeprefix("backbone."): v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
        elif isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        result = model.load_state_dict(state, strict=False)
        usable = len(state) - len(result.unexpected_keys)
        if usable == 0:
            raise CheckpointError(f"--init {init}: none of its weights fit a {arch}")
    return model


def landmark_net(arch: str, pretrained: bool = False, init: str | None = None):  # noqa: ANN201
    """A backbone regressing 10 numbers: (x, y) of the 5 landmarks, as fractions of the crop side."""
    import torch.nn as nn

    class LandmarkNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = create_backbone(arch, num_classes=10, pretrained=pretrained, init=init)

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.backbone(x).view(-1, 5, 2)

    return LandmarkNet()


def embedding_net(arch: str, dim: int, pretrained: bool = False, init: str | None = None):  # noqa: ANN201
    """A backbone's pooled features -> linear -> batch norm: a ``dim`` embedding (not normalised)."""
    import torch.nn as nn

    class EmbeddingNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = create_backbone(arch, num_classes=0, pretrained=pretrained, init=init)
            self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(self.backbone.num_features, dim), nn.BatchNorm1d(dim))

        def forward(self, x):  # noqa: ANN001, ANN202
            return self.head(self.backbone(x))

    return EmbeddingNet()


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint) -> Path:
    import torch

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": checkpoint.kind, "arch": checkpoint.arch,
        "preprocess": checkpoint.preprocess.to_dict(), "embedding_dim": checkpoint.embedding_dim,
        "state_dict": checkpoint.state_dict, "info": checkpoint.info,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out


def load_checkpoint(path: str | os.PathLike[str], kind: str) -> Checkpoint:
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist (train one with face-train {kind})")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{p} is not a readable torch checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a facesearch checkpoint (made by face-train)")
    if payload.get("kind") != kind:
        raise CheckpointError(f"{p} holds a {payload.get('kind')} model, not a {kind} model")
    return Checkpoint(kind=kind, arch=payload["arch"], preprocess=Preprocess.from_dict(payload["preprocess"]),
                      state_dict=payload["state_dict"], embedding_dim=payload.get("embedding_dim"),
                      info=payload.get("info", {}))


def build_from_checkpoint(checkpoint: Checkpoint):  # noqa: ANN201
    """The network of a checkpoint, weights loaded, in eval mode."""
    if checkpoint.kind == "landmarks":
        model = landmark_net(checkpoint.arch)
    else:
        model = embedding_net(checkpoint.arch, int(checkpoint.embedding_dim))
    model.load_state_dict(checkpoint.state_dict)
    return model.eval()
