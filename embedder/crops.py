"""Square face crops around a detection box (thumbnails, landmark regression)."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def square_crop(
    image: np.ndarray, box: Sequence[float], size: int, margin: float = 0.2, fill: int = 200
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A ``size`` x ``size`` crop of the square around ``box`` grown by ``margin`` of its side on each side,
    ``fill`` grey where it leaves the image. Returns the crop and its frame (left, top, side) in image
    pixels: crop pixel (u, v) is image point (left + u * side / size, top + v * side / size)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side_f = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = image.shape[:2]
    left, top = int(round(cx - side_f / 2)), int(round(cy - side_f / 2))
    s = max(1, int(round(side_f)))
    canvas = np.full((s, s, 3), fill, np.uint8)
    sx1, sy1, sx2, sy2 = max(0, left), max(0, top), min(w, left + s), min(h, top + s)
    if sx2 > sx1 and sy2 > sy1:
        canvas[sy1 - top : sy2 - top, sx1 - left : sx2 - left] = image[sy1:sy2, sx1:sx2]
    interpolation = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return cv2.resize(canvas, (size, size), interpolation=interpolation), (float(left), float(top), float(s))
