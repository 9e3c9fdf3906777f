"""Image loading in one place.

``load_image`` turns any file a user may point us at into an RGB ``uint8``
array of shape (H, W, 3), or raises :class:`ImageLoadError` with a short
reason. It applies the EXIF orientation, converts grayscale, palette, RGBA,
CMYK and 16-bit images, and refuses images whose header declares more pixels
than a limit (decompression bombs) before decoding them.

AVIF is Pillow's own; HEIC/HEIF needs pillow-heif, whose opener is registered
the first time a HEIF file is decoded (not at import).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facesearch.errors import ImageError

#: Default pixel-count limit: 50 megapixels, e.g. 8660 x 5773. Larger images are
#: refused before decoding; raise it with ``max_pixels`` for panoramas.
DEFAULT_MAX_PIXELS = 50_000_000

# We enforce our own limit before decoding; keep PIL's global bomb check out of
# the way so the limit is the one the caller chose.
Image.MAX_IMAGE_PIXELS = None


class ImageLoadError(ImageError):
    """An image could not be turned into pixels. ``reason`` says why, briefly.
    ``content_hash``: the file's hash when its bytes were read (corrupt, truncated, ...)."""

    def __init__(self, reason: str, path: str | None = None, content_hash: str | None = None) -> None:
        super().__init__(reason)
        self.path = path
        self.content_hash = content_hash
        self.args = (f"{path}: {reason}" if path else reason,)


class ImageTooLargeError(ImageLoadError):
    """The image declares more pixels than allowed (refused before decoding)."""


#: ISO-BMFF ``ftyp`` brands of HEIF images with HEVC (iPhone photos) and of the HEIF container.
HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"})
_heif_lock = threading.Lock()
_heif_registered = False


def is_heif(head: bytes) -> bool:
    """Whether the first 12 bytes of a file are a HEIF ``ftyp`` box (AVIF's brands are not)."""
    return len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def register_heif() -> None:
    """Let Pillow open HEIC/HEIF through pillow-heif (once per process).
    ImageLoadError when pillow-heif is not installed."""
    global _heif_registered
    if _heif_registered:
        return
    with _heif_lock:
        if _heif_registered:
            return
        try:
            from pillow_heif import register_heif_opener
        except ImportError as err:
            raise ImageLoadError("HEIC/HEIF image, but pillow-heif is not installed (pip install pillow-heif)") from err
        register_heif_opener()
        _heif_registered = True


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3).

    max_pixels: refuse images with more pixels than this (checked from the
        header, before decoding); higher admits bigger photos, costs memory.
    """
    path_str = os.fspath(path)
    try:
        size = os.path.getsize(path_str)
    except OSError as err:
        raise ImageLoadError(f"cannot read file: {err.strerror or err}", path_str) from err
    if size == 0:
        raise ImageLoadError("empty file (0 bytes)", path_str)
    try:
        with open(path_str, "rb") as handle:
            return _decode(handle, max_pixels)
    except ImageLoadError as err:
        raise ImageLoadError(err.reason, path_str) from err
    except OSError as err:
        raise ImageLoadError(f"cannot read file: {err.strerror or err}", path_str) from err


def file_hash(data: bytes) -> str:
    """The content hash galleries store per image (sha256, hex): same bytes, same image."""
    return hashlib.sha256(data).hexdigest()


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Like :func:`load_image`, also returning the file's content hash (one read of the file).
    An ImageLoadError for a file that could be read carries its hash too, so that a gallery
    can tell when a broken file was replaced."""
    path_str = os.fspath(path)
    try:
        with open(path_str, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise ImageLoadError(f"cannot read file: {err.strerror or err}", path_str) from err
    digest = file_hash(data)
    if not data:
        raise ImageLoadError("empty file (0 bytes)", path_str, digest)
    try:
        return _decode(io.BytesIO(data), max_pixels), digest
    except ImageLoadError as err:
        raise type(err)(err.reason, path_str, digest) from err


def load_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an in-memory image (an upload, a chat photo) as RGB uint8 (H, W, 3)."""
    if not data:
        raise ImageLoadError("empty image (0 bytes)")
    return _decode(io.BytesIO(data), max_pixels)


def _decode(stream: BinaryIO, max_pixels: int) -> np.ndarray:
    head = stream.read(12)
    stream.seek(0)
    if is_heif(head):
        register_heif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(stream)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageLoadError(f"invalid image size {width}x{height}")
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb_array(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as err:
        raise ImageLoadError("not a recognised image format") from err
    except Image.DecompressionBombError as err:  # pragma: no cover - we disable PIL's own check
        raise ImageLoadError(str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        # PIL reports truncated and corrupt data as OSError/SyntaxError/ValueError.
        raise ImageLoadError(f"corrupt or truncated image: {err}") from err


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any mode to an RGB uint8 array."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: scale to 8 bits instead of clipping.
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Composite transparent images on white, as viewers show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
