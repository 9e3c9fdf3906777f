"""Process-wide switches: set once by configure_process, applied to torch when it loads, never by a backend."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("torch")


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_switches_apply_when_torch_is_imported_later():
    out = _run(
        "import sys\n"
        "from embedder.runtime import configure_process\n"
        "configure_process(torch_threads=1)\n"
        "assert 'torch' not in sys.modules\n"  # configuring does not import torch
        "import torch\n"
        "print(torch.get_num_threads(), torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)\n"
    )
    assert out == "1 False False"


def test_switches_apply_at_once_when_torch_is_loaded_and_backends_leave_them():
    out = _run(
        "import numpy as np, torch\n"
        "from embedder import create\n"
        "torch.set_num_threads(2)\n"
        "create('embedder', 'dlib-resnet-torch', device='cpu').embed(np.zeros((1, 150, 150, 3), np.uint8))\n"
        "before = (torch.get_num_threads(), torch.backends.cudnn.allow_tf32)\n"
        "from embedder.runtime import configure_process\n"
        "configure_process(torch_threads=1)\n"
        "print(before, (torch.get_num_threads(), torch.backends.cudnn.allow_tf32))\n"
    )
    assert out == "(2, True) (1, False)"


def test_bad_thread_count_is_refused():
    from embedder.runtime import configure_process

    with pytest.raises(ValueError, match="torch_threads"):
        configure_process(torch_threads=0)
