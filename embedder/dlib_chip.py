"""dlib's face-chip extraction (``extract_image_chip``), reproduced pixel for pixel.

dlib's ResNet was trained on chips cut this way, so the torch port sees the
same input as dlib itself. The generic :func:`embedder.align.warp` (OpenCV)
differs from it in ways that move embeddings by up to 7e-4 in cosine:

- dlib samples bilinearly in double precision and truncates to uint8;
  OpenCV quantises sub-pixel positions to 1/32 and rounds.
- A sample whose 2x2 neighbourhood is not wholly inside the image is black
  in dlib; OpenCV blends the edge pixels with the border.
- When the chip is much smaller than the face, dlib first shrinks the image
  with its pyramid_down<2> (a [1 4 6 4 1] filter and 2:1 decimation, in
  integers), as many times as the chip's size asks for.

Rules from dlib/image_transforms/interpolation.h (chip_details,
extract_image_chips, interpolate_bilinear) and image_pyramid.h
(pyramid_down<2>). Pure functions; numpy only, except that
:func:`extract_dlib_chip` hands the sampling to dlib's own
``extract_image_chip`` when dlib is installed (about 6x faster, the same
pixels: the numpy port is the reference that tests compare it with).
"""

from __future__ import annotations

import math

import numpy as np

from embedder.geometry import estimate_similarity

Rect = tuple[float, float, float, float]  # left, top, right, bottom (inclusive, dlib drectangle)


def chip_details(points: np.ndarray, template_points: np.ndarray, size: int) -> tuple[Rect, float]:
    """dlib's ``chip_details(chip_points, img_points, dims)``: the extraction
    rectangle and angle for a ``size`` x ``size`` chip."""
    to_image = estimate_similarity(template_points, points)
    px, py = to_image[0, 0], to_image[1, 0]
    angle = math.atan2(py, px)
    scale = math.sqrt(px * px + py * py)
    half = size / 2.0
    cx = to_image[0, 0] * half + to_image[0, 1] * half + to_image[0, 2]
    cy = to_image[1, 0] * half + to_image[1, 1] * half + to_image[1, 2]
    w = size * scale - 1
    return (cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2), angle


def _area(rect: Rect) -> float:
    left, top, right, bottom = rect
    if left > right or top > bottom:
        return 0.0
    return (right - left + 1) * (bottom - top + 1)


def _rect_down(rect: Rect) -> Rect:
    """pyramid_down<2>::rect_down: each corner through point_down(p) = p/2 - (1.25, 0.75)."""
    left, top, right, bottom = rect
    return (left / 2 - 1.25, top / 2 - 0.75, right / 2 - 1.25, bottom / 2 - 0.75)


def _rotate(center: tuple[float, float], point: tuple[float, float], angle: float) -> tuple[float, float]:
    s, c = math.sin(angle), math.cos(angle)
    x, y = point[0] - center[0], point[1] - center[1]
    return (c * x - s * y + center[0], s * x + c * y + center[1])


def pyramid_down2(image: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2> for RGB images: [1 4 6 4 1] along rows, then
    columns, integer sums divided by 256 (truncating); (rows-3)//2 x (cols-3)//2."""
    rows, cols = image.shape[:2]
    if rows <= 8 or cols <= 8:
        return np.zeros((0, 0, 3), dtype=np.uint8)
    v = image.astype(np.uint32)
    t = (cols - 3) // 2
    horiz = v[:, 0 : 2 * t : 2] + 4 * v[:, 1 : 2 * t + 1 : 2] + 6 * v[:, 2 : 2 * t + 2 : 2] \
        + 4 * v[:, 3 : 2 * t + 3 : 2] + v[:, 4 : 2 * t + 4 : 2]
    d = (rows - 3) // 2
    both = horiz[0 : 2 * d : 2] + 4 * horiz[1 : 2 * d + 1 : 2] + 6 * horiz[2 : 2 * d + 2 : 2] \
        + 4 * horiz[3 : 2 * d + 3 : 2] + horiz[4 : 2 * d + 4 : 2]
    return (both // 256).astype(np.uint8)


_GRIDS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    if (rows, cols) not in _GRIDS:
        v, u = np.mgrid[0:rows, 0:cols].astype(np.float64)
        _GRIDS[(rows, cols)] = (u.ravel(), v.ravel())
    return _GRIDS[(rows, cols)]


def sample_bilinear(source: np.ndarray, chip_to_source: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """dlib's transform_image + interpolate_bilinear: double precision,
    truncation to uint8, black where the 2x2 neighbourhood leaves the image."""
    chip = np.zeros((rows * cols, 3), dtype=np.uint8)
    if source.shape[0] == 0 or source.shape[1] == 0:
        return chip.reshape(rows, cols, 3)
    height, width = source.shape[:2]
    u, v = _grid(rows, cols)
    x = chip_to_source[0, 0] * u + chip_to_source[0, 1] * v + chip_to_source[0, 2]
    y = chip_to_source[1, 0] * u + chip_to_source[1, 1] * v + chip_to_source[1, 2]
    left, top = np.floor(x), np.floor(y)
    inside = np.flatnonzero((left >= 0) & (top >= 0) & (left + 1 < width) & (top + 1 < height))
    fx = (x - left)[inside, None]
    fy = (y - top)[inside, None]
    index = top[inside].astype(np.intp) * width + left[inside].astype(np.intp)
    corners = np.take(source.reshape(-1, 3), np.concatenate([index, index + 1, index + width, index + width + 1]), axis=0)
    tl, tr, bl, br = corners.astype(np.float64).reshape(4, -1, 3)
    # dlib: (1-fy)*((1-fx)*tl + fx*tr) + fy*((1-fx)*bl + fx*br), same operations in the same order, in place.
    gx = 1 - fx
    value = tl * gx
    value += fx * tr
    value *= 1 - fy
    lower = bl * gx
    lower += fx * br
    lower *= fy
    value += lower
    chip[inside] = value.astype(np.uint8)  # C++ static_cast: truncation
    return chip.reshape(rows, cols, 3)


def _affine_from_3(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> np.ndarray:
    a = np.array([[x, y, 1.0] for x, y in src])
    return np.linalg.solve(a, np.array(dst)).T  # 2x3


_DLIB: list = []  # [module or None] once looked up


def _native_dlib() -> object | None:
    """dlib, if it is installed (looked up once); None otherwise."""
    if not _DLIB:
        try:
            import dlib
        except ImportError:
            dlib = None
        _DLIB.append(dlib)
    return _DLIB[0]


def extract_dlib_chip(image: np.ndarray, points: np.ndarray, template_points: np.ndarray, size: int,
                      native: bool | None = None) -> np.ndarray:
    """The ``size`` x ``size`` chip dlib's ``get_face_chip`` would cut for
    these landmarks (``template_points`` in chip pixels, e.g. the padded dlib-5 template).

    native: sample with dlib's ``extract_image_chip`` (None: when dlib is installed
    and the image is RGB uint8), else with the numpy port below; same pixels."""
    rect, angle = chip_details(np.asarray(points, np.float64), np.asarray(template_points, np.float64), size)
    dlib = _native_dlib() if native is not False else None
    if native and dlib is None:
        raise ImportError("native=True needs dlib")
    if dlib is not None and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        details = dlib.chip_details(dlib.drectangle(*rect), dlib.chip_dims(size, size), angle)
        return np.asarray(dlib.extract_image_chip(np.ascontiguousarray(image), details))
    return _extract_numpy(image, rect, angle, size)


def _extract_numpy(image: np.ndarray, rect: Rect, angle: float, size: int) -> np.ndarray:
    """dlib's extract_image_chip, in numpy, for the rectangle and angle of :func:`chip_details`."""
    rows = cols = size
    height, width = image.shape[:2]
    left, top, right, bottom = rect

    # How deep the pyramid must go, and how much border the crop needs for it.
    depth, grow = 0, 2.0
    down = _rect_down(rect)
    while _area(down) > rows * cols:
        down = _rect_down(down)
        depth += 1
        grow = grow * 2 + 2

    center = ((left + right) / 2, (top + bottom) / 2)
    corners = [_rotate(center, p, angle) for p in ((left, top), (right, top), (left, bottom), (right, bottom))]
    box = (
        max(min(p[0] for p in corners) - grow, 0.0),
        max(min(p[1] for p in corners) - grow, 0.0),
        min(max(p[0] for p in corners) + grow, float(width - 1)),
        min(max(p[1] for p in corners) + grow, float(height - 1)),
    )
    if box[0] > box[2] or box[1] > box[3]:
        return np.zeros((rows, cols, 3), dtype=np.uint8)
    bl, bt, br, bb = (math.floor(v + 0.5) for v in box)
    if bl > br or bt > bb:
        return np.zeros((rows, cols, 3), dtype=np.uint8)

    local = (left - bl, top - bt, right - bl, bottom - bt)
    level = -1
    while _area(_rect_down(local)) > rows * cols:
        level += 1
        local = _rect_down(local)
    source = image[max(bt, 0) : min(bb, height - 1) + 1, max(bl, 0) : min(br, width - 1) + 1]
    for _ in range(level + 1):
        source = pyramid_down2(source)

    l2, t2, r2, b2 = local
    local_center = ((l2 + r2) / 2, (t2 + b2) / 2)
    to_points = [_rotate(local_center, p, angle) for p in ((l2, t2), (r2, t2), (l2, b2))]
    chip_to_source = _affine_from_3([(0.0, 0.0), (cols - 1.0, 0.0), (0.0, rows - 1.0)], to_points)
    return sample_bilinear(source, chip_to_source, rows, cols)
