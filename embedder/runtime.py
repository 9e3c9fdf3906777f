"""Process-wide switches for the native libraries the backends run on.

torch keeps these settings in global state, so no backend touches them: the
code that starts a process sets them once, with :func:`configure_process`.

- The command-line tools (``face-index``, ``face-search``, ``face-train``) call
  ``configure_process()`` in their group callbacks.
- The indexer's worker processes (``indexer.mapper.init_worker``) call
  ``configure_process(torch_threads=1)``: each worker runs one image at a time,
  and many workers share the cores.
- Code that builds a ``FacePipeline`` or a ``Searcher`` itself (a script, a
  notebook) and embeds with torch on CUDA should call ``configure_process()``
  first: without it, cuDNN's TF32 convolutions move ``dlib-resnet-torch``
  embeddings away from dlib's (about 1e-3 in cosine) and the backend logs a
  warning when it loads.

torch is not imported for this. If it is imported already, the switches apply
at once; otherwise right after the process first imports it, so a process that
never uses torch (a worker that only cuts crops, dlib's own embedder) does not
pay for torch (about 1 s and 270 MB a process).
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessSettings:
    """What :func:`configure_process` was last asked for."""

    torch_threads: int | None = None
    exact_fp32: bool = True


_settings: ProcessSettings | None = None


def configure_process(torch_threads: int | None = None, exact_fp32: bool = True) -> None:
    """Set the process-wide switches; call once where the process starts (a later call replaces them).

    torch_threads: torch's intra-op thread count (``torch.set_num_threads``);
        None leaves torch's default (one per core, or OMP_NUM_THREADS). ONNX
        Runtime sessions (``dlib-resnet-onnx``) read it through
        :func:`configured_threads` when they load.
    exact_fp32: turn TF32 off for cuDNN convolutions and CUDA matmuls, so that
        fp32 on a GPU computes what it does on a CPU (``dlib-resnet-torch``
        equals dlib only so). False leaves torch's defaults.
    """
    global _settings
    if torch_threads is not None and torch_threads < 1:
        raise ValueError(f"torch_threads must be >= 1 or None, got {torch_threads}")
    _settings = ProcessSettings(torch_threads, exact_fp32)
    torch = sys.modules.get("torch")
    if torch is not None:
        _apply(torch)
    elif not any(isinstance(finder, _ApplyAfterTorchImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ApplyAfterTorchImport())


def configured_threads() -> int | None:
    """The intra-op thread count :func:`configure_process` was given (None: not set).
    Backends on other runtimes than torch (ONNX Runtime sessions) follow it too."""
    return None if _settings is None else _settings.torch_threads


def _apply(torch: ModuleType) -> None:
    if _settings is None:
        return
    if _settings.torch_threads is not None:
        torch.set_num_threads(_settings.torch_threads)
    if _settings.exact_fp32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    log.debug("torch configured: %s", _settings)


class _ApplyAfterTorchImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself. When ``torch`` is imported, it asks the other
    finders for it and has its loader call :func:`_apply` right after torch's
    own initialisation; then it leaves ``sys.meta_path``."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != "torch":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            try:
                run(module)
            finally:
                del loader.exec_module
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _apply(module)

        loader.exec_module = exec_module  # this spec's own loader instance only
        return spec
