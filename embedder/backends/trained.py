"""Backends for trained models: ``face-train`` checkpoints (timm), YOLO face
detectors (ultralytics) and insightface-style ArcFace ONNX files.

None of them ships weights: each takes a path, loads it on first use, and says
clearly what is missing and where such files come from.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from embedder.align import ARCFACE_112, AlignTemplate
from embedder.backends.base import BackendUnavailableError, LazyModel, import_onnxruntime
from embedder.crops import square_crop
from embedder.registry import register
from embedder.types import Detection

ONNX_HELP = (
    "ArcFace ONNX files come in insightface's model packs (e.g. buffalo_l's w600k_r50.onnx, 512-D), "
    "from https://github.com/deepinsight/insightface/tree/master/model_zoo; download the pack on a "
    "machine with internet and pass the .onnx path. Mind their licence: non-commercial research only."
)


class _TorchLazy(LazyModel):
    """One model shared by all threads (torch and onnxruntime inference are thread-safe)."""

    per_thread = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_predict_lock", None)
        return state


def _require(path: str | None, what: str, hint: str) -> Path:
    if not path:
        raise BackendUnavailableError(f"the {what} backend needs a file: {hint}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise BackendUnavailableError(f"{what}: {p} does not exist. {hint}")
    return p


def _checkpoint(path: Path, kind: str):  # noqa: ANN202
    from embedder.nets import CheckpointError, build_from_checkpoint, load_checkpoint

    try:
        ckpt = load_checkpoint(path, kind)
        return ckpt, build_from_checkpoint(ckpt)
    except CheckpointError as err:
        raise BackendUnavailableError(str(err)) from err


@register("landmarks", "timm-landmarks")
class TimmLandmarks(_TorchLazy):
    """A face-train landmarks checkpoint: 5 points regressed from a square crop around each box."""

    name = "timm-landmarks"
    scheme = "canonical5"

    def __init__(self, checkpoint: str | None = None, batch_size: int = 64) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.batch_size = int(batch_size)
        self._path = _require(checkpoint, "timm-landmarks", "train one with face-train landmarks")

    def _load(self) -> Any:
        return _checkpoint(self._path, "landmarks")

    def landmarks(self, image: np.ndarray, detections: Sequence[Detection]) -> list[Detection]:
        import torch

        if not detections:
            return []
        ckpt, model = self._get()
        pre = ckpt.preprocess
        size, margin = pre.crop_size, float(pre.margin or 0.2)
        crops, frames = [], []
        for det in detections:
            crop, (left, top, side) = square_crop(image, det.box, size, margin)
            crops.append(crop)
            frames.append((left, top, side))
        with torch.inference_mode():
            points = torch.cat([model(pre.normalise(np.stack(crops[i:i + self.batch_size])))
                                for i in range(0, len(crops), self.batch_size)]).numpy().astype(np.float64)
        out = []
        for det, pts, (left, top, side) in zip(detections, points, frames):
            out.append(det.replace(landmarks=pts * side + np.array([left, top]), keypoints=None, keypoint_scheme=None))
        return out

    def version(self) -> str:
        return f"face-train landmarks checkpoint {Path(self.checkpoint).name}"

    def options(self) -> dict[str, Any]:
        return {"checkpoint": str(self._path.resolve()), "batch_size": self.batch_size}

    def describe(self) -> dict[str, Any]:
        ckpt, _ = self._get()
        return {**self.options(), "arch": ckpt.arch, "crop_size": ckpt.preprocess.crop_size}


@register("landmarks", "from-detector")
class DetectorLandmarks:
    """Keeps the landmarks the detector found (a YOLO pose model gives boxes and 5 points at once)."""

    name = "from-detector"
    scheme = "canonical5"

    def landmarks(self, image: np.ndarray, detections: Sequence[Detection]) -> list[Detection]:
        missing = [d for d in detections if d.landmarks is None]
        if missing:
            raise BackendUnavailableError(
                "landmarks from-detector needs a detector that finds landmarks (yolo); use dlib-5 otherwise")
        return list(detections)

    def version(self) -> str:
        return "the detector's own landmarks"

    def describe(self) -> dict[str, Any]:
        return {}


@register("embedder", "timm-arcface")
class TimmArcFace(_TorchLazy):
    """A face-train embedder checkpoint; its crop, template and normalisation come from the checkpoint."""

    name = "timm-arcface"
    batched = True

    def __init__(self, checkpoint: str | None = None, device: str = "auto", batch_size: int = 64) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.device = device
        self.batch_size = int(batch_size)
        self._path = _require(checkpoint, "timm-arcface", "train one with face-train embedder")
        from embedder.nets import CheckpointError, load_checkpoint

        try:  # the crop template and dimension are needed before the first embedding
            meta = load_checkpoint(self._path, "embedder")
        except CheckpointError as err:
            raise BackendUnavailableError(str(err)) from err
        pre = meta.preprocess
        self.dim = int(meta.embedding_dim)
        self.crop = AlignTemplate(name=pre.template_name or f"trained-{pre.crop_size}",
                                  points=tuple(tuple(p) for p in pre.template), size=(pre.crop_size, pre.crop_size))
        self._meta = meta

    def _load(self) -> Any:
        import torch

        from embedder.nets import build_from_checkpoint

        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        return build_from_checkpoint(self._meta).to(device), device

    def embed(self, crops: np.ndarray) -> np.ndarray:
        import torch

        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        model, device = self._get()
        out = []
        with torch.inference_mode():
            for i in range(0, len(crops), self.batch_size):
                x = self._meta.preprocess.normalise(crops[i:i + self.batch_size]).to(device)
                out.append(torch.nn.functional.normalize(model(x), dim=1).float().cpu().numpy())
        return np.concatenate(out)

    def version(self) -> str:
        return f"face-train embedder checkpoint {Path(self.checkpoint).name} ({self._meta.arch})"

    def options(self) -> dict[str, Any]:
        return {"checkpoint": str(self._path.resolve()), "device": self.device, "batch_size": self.batch_size}

    def describe(self) -> dict[str, Any]:
        return {**self.options(), "arch": self._meta.arch, "crop": self.crop.name,
                "training": {k: v for k, v in self._meta.info.items() if k in ("tpr_at_1e-2", "threshold", "epochs")}}


@register("embedder", "onnx-arcface")
class OnnxArcFace(_TorchLazy):
    """An insightface-style ArcFace ONNX file: 112x112 RGB input, (x - 127.5) / 127.5, run by onnxruntime."""

    name = "onnx-arcface"
    crop = ARCFACE_112
    batched = True

    def __init__(self, model: str | None = None, providers: Sequence[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self._path = _require(model, "onnx-arcface", ONNX_HELP)
        self.providers = list(providers) if providers else None
        self.dim = int(self._session()[2])

    def _session(self) -> tuple[Any, str, int]:
        return self._get()

    def _load(self) -> Any:
        ort = import_onnxruntime("onnx-arcface")
        providers = self.providers or ort.get_available_providers()
        try:
            session = ort.InferenceSession(str(self._path), providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
            raise BackendUnavailableError(f"{self._path} is not a loadable ONNX model: {err}") from err
        inp = session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or shape[1] != 3 or (isinstance(shape[2], int) and shape[2] != 112):
            raise BackendUnavailableError(f"{self._path}: expected a (N, 3, 112, 112) input, got {shape}. {ONNX_HELP}")
        dim = session.get_outputs()[0].shape[-1]
        if not isinstance(dim, int):
            probe = session.run(None, {inp.name: np.zeros((1, 3, 112, 112), np.float32)})[0]
            dim = probe.shape[-1]
        return session, inp.name, int(dim)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        session, name, _ = self._get()
        x = (np.asarray(crops, np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5
        out = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])  # some packs fix N=1
        out = out.reshape(len(x), -1).astype(np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def version(self) -> str:
        return f"onnx {Path(self.model).name}"

    def options(self) -> dict[str, Any]:
        return {"model": str(self._path.resolve())}

    def describe(self) -> dict[str, Any]:
        return self.options()


@register("detector", "yolo")
class YoloFaceDetector(_TorchLazy):
    """A YOLO face model through ultralytics; a pose model (5 keypoints, from
    face-train detector) also gives the landmarks (use landmarks ``from-detector``)."""

    name = "yolo"

    def __init__(self, weights: str | None = None, conf: float = 0.25, imgsz: int = 640, device: str = "auto",
                 min_score: float = 0.0) -> None:
        super().__init__()
        self.weights = weights
        self._path = _require(weights, "yolo", "train one with face-train detector (ultralytics would download "
                                               "named hub weights such as yolov8n-face.pt, which needs the network)")
        self.conf, self.imgsz, self.device, self.min_score = float(conf), int(imgsz), device, float(min_score)

    def _load(self) -> Any:
        os.environ.setdefault("YOLO_OFFLINE", "1")
        try:
            from ultralytics import YOLO
        except ImportError as err:
            raise BackendUnavailableError("the yolo detector needs ultralytics: pip install 'facesearch[train]'") from err
        return YOLO(str(self._path))

    def detect(self, image: np.ndarray) -> list[Detection]:
        import torch

        model = self._get()
        device = ("cuda:0" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        with self._lock_predict():
            result = model.predict(np.ascontiguousarray(image[:, :, ::-1]), conf=max(self.conf, self.min_score),
                                   imgsz=self.imgsz, device=device, verbose=False)[0]
        boxes = result.boxes.xyxy.cpu().numpy().astype(np.float64)
        scores = result.boxes.conf.cpu().numpy().astype(np.float64)
        points = result.keypoints.xy.cpu().numpy().astype(np.float64) if result.keypoints is not None else None
        out = []
        for i, (box, score) in enumerate(zip(boxes, scores)):
            landmarks = points[i] if points is not None and points.shape[1] == 5 else None
            out.append(Detection(box=tuple(float(v) for v in box), score=float(score), landmarks=landmarks))
        return out

    def _lock_predict(self) -> threading.Lock:
        # ultralytics' predictor keeps per-call state on the model object
        if not hasattr(self, "_predict_lock") or self._predict_lock is None:
            self._predict_lock = threading.Lock()
        return self._predict_lock

    def version(self) -> str:
        return f"ultralytics YOLO {Path(self.weights).name}"

    def options(self) -> dict[str, Any]:
        return {"weights": str(self._path.resolve()), "conf": self.conf, "imgsz": self.imgsz, "device": self.device,
                "min_score": self.min_score}

    def describe(self) -> dict[str, Any]:
        return self.options()
