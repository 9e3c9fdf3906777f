"""face-index run leaves no process behind: when it ends, normally or on Ctrl-C,
nothing of its process group remains (workers and multiprocessing's resource
tracker included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CELEBA, REPO

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.needs_data


def _group(pgid: int) -> list[str]:
    """Processes of group ``pgid`` (zombies included: they are not yet gone)."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                left.append(f"{proc.pid} {proc.info['status']} {' '.join(proc.info['cmdline'] or [])[:120]}")
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return left


def _start(out: Path, limit: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "indexer.cli", "run", str(CELEBA), "--format", "celeba", "--split", "test",
           "--limit", str(limit), "--workers", "2", "--no-progress", "--out", str(out)]
    # SIGINT back to its default: a shell that runs pytest in the background ignores it,
    # and the child would inherit that (a terminal's Ctrl-C reaches a process that handles it).
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_no_process_left_after_a_run(tmp_path):
    proc = _start(tmp_path / "g", 12)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert _group(proc.pid) == []


@pytest.mark.parametrize("when", ["start-up", "mid-run"])
def test_no_process_left_after_ctrl_c(tmp_path, when):
    """Ctrl-C while the workers start and load their models (they start before the
    dataset is listed), and while they map images: either way the command says it was
    interrupted, exits 1 and leaves no process behind."""
    proc = _start(tmp_path / "g", 2000)
    deadline = time.monotonic() + 120
    # Wait for the workers (and the resource tracker) to be running, then press Ctrl-C:
    # the terminal sends SIGINT to the whole foreground process group.
    while time.monotonic() < deadline and proc.poll() is None:
        if len(psutil.Process(proc.pid).children()) >= (2 if when == "start-up" else 3):
            break
        time.sleep(0.02)
    time.sleep(1.0 if when == "mid-run" else 0.0)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted" in err, err[-2000:]
    assert _group(proc.pid) == []
