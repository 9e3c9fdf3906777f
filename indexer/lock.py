"""The writer lock: one process changes a gallery at a time.

``GALLERY/.lock`` is held with ``flock`` for the whole change, and holds a line
naming its holder (pid, host, command, start time). The kernel drops the lock
when its process dies, however it dies, so a lock left by a killed process is
simply taken over; its stale holder line is then overwritten. Readers take no
lock: they read gallery.json, which names a complete generation.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

from facesearch.errors import GalleryError
from indexer.layout import LOCK_FILE

log = logging.getLogger(__name__)


class GalleryLockedError(GalleryError):
    """Another process is changing the gallery."""


class WriterLock:
    """``with WriterLock(gallery_dir, "face-index add"):`` holds the gallery's writer lock."""

    def __init__(self, gallery_dir: str | os.PathLike[str], command: str) -> None:
        self.path = Path(gallery_dir) / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise GalleryLockedError(
                f"{self.path.parent} is being changed by another process ({holder}); "
                "wait for it to finish, or stop it"
            ) from None
        previous = _read_holder(fd)
        if previous != "unknown holder":
            log.info("took over the lock of a process that is gone (%s)", previous)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # no stale holder line once released
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return "unknown holder"
    if not isinstance(data, dict):
        return "unknown holder"
    return f"pid {data.get('pid')} on {data.get('host')}: {data.get('command')}, since {data.get('since')}"
