"""Leave no helper process behind when a command-line tool ends.

A process that starts workers with the ``spawn`` context (the indexer's
``ProcessPoolExecutor``) also starts multiprocessing's resource tracker. The
pool's workers are joined when it shuts down, but the tracker only notices
that its parent is gone after the parent has exited: it lives on for a moment
as an orphan (a zombie on machines whose init reaps slowly), still in the
command's process group. :func:`stop_helper_processes` ends it and waits for
it, so that when the command exits, its process group is empty.
"""

from __future__ import annotations

import gc
import logging
import sys

log = logging.getLogger(__name__)


def stop_helper_processes() -> None:
    """Stop and reap multiprocessing's resource tracker, if this process started one.

    Call only where the process is about to exit (a CLI's end): the pools must be
    shut down already. Their semaphores are collected first, so that none is
    reported as leaked and none starts a new tracker afterwards.
    """
    if "multiprocessing.resource_tracker" not in sys.modules:
        return
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)  # private, but present in 3.8-3.13
    if tracker is None or stop is None or getattr(tracker, "_pid", None) is None:
        return
    gc.collect()
    try:
        stop()
    except Exception as err:  # noqa: BLE001 - best effort at exit
        log.debug("could not stop the resource tracker: %s", err)
