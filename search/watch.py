"""``face-search watch``: faces in live video (a camera or a file), labelled with their nearest gallery identity.

Each processed frame goes through the gallery's pipeline; every face gets a
box coloured by the calibrated verdict and its nearest identity with the
cosine. Frames go to a window when there is a display (and OpenCV has a GUI),
otherwise, or when ``out`` is given, to a video file.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facesearch.errors import ConfigurationError
from search.calibration import VERDICT_BGR
from search.searcher import FaceResult, Searcher

log = logging.getLogger(__name__)



class WatchError(ConfigurationError):
    """A video source or output that cannot be used."""


@dataclass(frozen=True)
class WatchSummary:
    frames: int
    processed: int
    faces: int
    seconds: float
    output: Path | None
    identities: dict[str, int]  # nearest identity -> frames it was drawn in


def open_source(source: str | int) -> cv2.VideoCapture:
    """A camera index ("0", 0) or a video file."""
    target = int(source) if isinstance(source, int) or str(source).isdigit() else str(source)
    if isinstance(target, str) and not Path(target).exists():
        raise WatchError(f"video file {target} does not exist")
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        kind = "camera" if isinstance(target, int) else "video file"
        raise WatchError(f"cannot open {kind} {target}")
    return capture


def has_display() -> bool:
    """A display, and an OpenCV build with a GUI (opencv-python-headless has none)."""
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.name == "nt"):
        return False
    try:
        cv2.namedWindow("facesearch-probe")
        cv2.destroyWindow("facesearch-probe")
        return True
    except cv2.error:
        return False


def annotate(frame: np.ndarray, results: list[FaceResult]) -> np.ndarray:
    """Draw each face's box and its nearest identity + cosine on a BGR frame (in place)."""
    h = frame.shape[0]
    scale = max(0.4, h / 900)
    for r in results:
        x1, y1, x2, y2 = (int(round(v)) for v in r.face.detection.box)
        best = r.matches[0] if r.matches else None
        colour = VERDICT_BGR.get(best.verdict if best else None, VERDICT_BGR[None])
        cv2.rectangle(frame, (x1, y1), (x2, y2), colour, max(2, int(2 * scale)))
        label = "no match" if best is None else f"{best.identity if best.identity is not None else '?'} {best.cosine:.3f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = max(0, y1 - th - base - 4)
        cv2.rectangle(frame, (x1, top), (x1 + tw + 4, top + th + base + 4), colour, -1)
        cv2.putText(frame, label, (x1 + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return frame


def watch(
    searcher: Searcher,
    source: str | int,
    out: str | os.PathLike[str] | None = None,
    every: int = 1,
    max_frames: int | None = None,
    show: bool | None = None,
) -> WatchSummary:
    """Label the faces of a video.

    every: search every n-th frame and keep its labels for the frames between;
    higher is smoother on a slow CPU, but labels lag behind moving faces.
    show: None opens a window when there is a display; otherwise frames go to ``out``.
    """
    if every < 1:
        raise WatchError(f"every must be >= 1, got {every}")
    capture = open_source(source)
    window = has_display() if show is None else show
    if out is None and not window:
        stem = "camera" if str(source).isdigit() else Path(str(source)).stem
        out = Path(f"watch-{stem}.mp4")
    writer = None
    fps = capture.get(cv2.CAP_PROP_FPS) or 0
    fps = fps if 1 <= fps <= 240 else 25.0
    frames = processed = faces = 0
    identities: dict[str, int] = {}
    results: list[FaceResult] = []
    start = time.perf_counter()
    try:
        while max_frames is None or frames < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if frames % every == 0:
                results = searcher.search(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), k=1)
                processed += 1
            for r in results:
                if r.matches:
                    key = str(r.matches[0].identity)
                    identities[key] = identities.get(key, 0) + 1
            faces += len(results)
            annotate(frame, results)
            frames += 1
            if out is not None:
                if writer is None:
                    Path(out).parent.mkdir(parents=True, exist_ok=True)
                    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frame.shape[1], frame.shape[0]))
                    if not writer.isOpened():
                        raise WatchError(f"cannot write video {out} (mp4v codec unavailable?)")
                writer.write(frame)
            if window:
                cv2.imshow("facesearch watch (q quits)", frame)
                if cv2.waitKey(1) & 0xFF == ord("q"):
                    break
    except KeyboardInterrupt:
        log.info("stopped after %d frames", frames)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
        if window:
            cv2.destroyAllWindows()
    seconds = time.perf_counter() - start
    if frames == 0:
        raise WatchError(f"no frame could be read from {source}")
    log.info("%d frames (%d searched) in %.1f s, %.1f frames/s", frames, processed, seconds, frames / max(seconds, 1e-9))
    return WatchSummary(frames, processed, faces, seconds, Path(out) if out is not None else None, identities)
