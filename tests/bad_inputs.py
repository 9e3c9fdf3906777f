"""A corpus of bad and awkward inputs for an index run, each with its expected outcome.

``make_corpus(folder)`` writes the corpus (nothing of it is committed: the faces come
from ../shared/data at run time) and returns ``{path: Expected}``, the path as the
gallery or the listing reports it (relative, valid UTF-8). Every entry ends up in
exactly one place: manifest rows (``faces``), a failure record (``kind`` and a
fragment of its reason), or the listing's ``skipped`` (reason, fragment of its detail).

    python -m tests.bad_inputs /tmp/corpus      # writes it and prints the table
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.records import SKIP_DUPLICATE, SKIP_HIDDEN, SKIP_LOOP, SKIP_NOT_IMAGE, SKIP_NOT_REGULAR

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))
FACES = SHARED / "celeba" / "img_align_celeba"
#: real CelebA test-split crops with one face each that the default pipeline finds
FACE, FACE_B, FACE_C = FACES / "182638.jpg", FACES / "182639.jpg", FACES / "182642.jpg"
#: a real group photo in which the default pipeline finds 3 faces
GROUP, GROUP_FACES = SHARED / "photos" / "group4.jpg", 3


@dataclass(frozen=True)
class Expected:
    """One corpus entry's outcome: indexed with ``faces`` faces, or a failure of ``kind``,
    or skipped by the reader for ``skipped`` (a ``data.records.SKIP_*`` reason); ``text``
    is a fragment of the failure's reason or of the skip's detail."""

    what: str
    faces: int | None = None
    kind: str | None = None
    skipped: str | None = None
    text: str = ""

    @property
    def outcome(self) -> str:
        if self.faces is not None:
            return f"indexed, {self.faces} face{'s' if self.faces != 1 else ''}"
        if self.kind is not None:
            return f"failure {self.kind}: ...{self.text}..."
        return f"skipped ({self.skipped}{': ' + self.text if self.text else ''})"


def _rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def _encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small, valid PNG whose header declares ``width`` x ``height`` (nothing that size is allocated)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def heic_bytes(image: Image.Image) -> bytes:
    import pillow_heif

    buffer = io.BytesIO()
    pillow_heif.from_pillow(image).save(buffer, quality=90)
    return buffer.getvalue()


def make_corpus(folder: str | os.PathLike[str]) -> dict[str, Expected]:
    """Write the corpus into ``folder`` (created; it should be empty) and return its expectations."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    face, face_b = _rgb(FACE), _rgb(FACE_B)
    data = FACE.read_bytes()
    expect: dict[str, Expected] = {}

    def write(name: str, content: bytes, expected: Expected) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        expect[name] = expected

    # Images that must be indexed: one face each unless said.
    write("good.jpg", data, Expected("a plain JPEG", faces=1))
    write("png-named.jpg", _encoded(face_b, "PNG"), Expected("wrong extension: a PNG named .jpg", faces=1))
    write("cmyk.jpg", _encoded(face.convert("CMYK"), "JPEG", quality=95), Expected("CMYK JPEG", faces=1))
    gray16 = np.asarray(face.convert("L"), np.uint16) * 257
    write("gray16.png", _encoded(Image.fromarray(gray16), "PNG"), Expected("16-bit grayscale PNG", faces=1))
    rgba = face_b.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, :8] = 0  # a transparent strip: composited on white
    rgba.putalpha(Image.fromarray(alpha))
    write("rgba.png", _encoded(rgba, "PNG"), Expected("RGBA PNG with transparency", faces=1))
    write("palette.png", _encoded(face.convert("P"), "PNG"), Expected("palette (P) PNG", faces=1))
    write("animated.gif", _encoded(face, "GIF", save_all=True, duration=100, loop=0,
                                   append_images=[Image.new("RGB", face.size, (0, 0, 0))]),
          Expected("animated GIF: the first frame is indexed", faces=1))
    sideways = Image.fromarray(np.ascontiguousarray(np.rot90(np.asarray(face_b), k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    write("exif-rotated.jpg", _encoded(sideways, "JPEG", exif=exif.tobytes(), quality=95),
          Expected("EXIF orientation 6 (stored sideways)", faces=1))
    write("face.avif", _encoded(_rgb(FACE_C), "AVIF", quality=90), Expected("AVIF", faces=1))
    write("face.heic", heic_bytes(_rgb(FACE_C)), Expected("HEIC (pillow-heif)", faces=1))
    write("x.jpg/inner.jpg", FACE_C.read_bytes(), Expected("an image inside a folder named x.jpg/", faces=1))
    (root / "group.jpg").symlink_to(GROUP)
    expect["group.jpg"] = Expected("symlink to a real group photo outside the folder", faces=GROUP_FACES)
    (root / ".store").mkdir()
    shutil.copy(FACE_B, root / ".store" / "face.jpg")
    expect[".store"] = Expected("hidden folder: not searched", skipped=SKIP_HIDDEN, text="folder")
    (root / "stored.jpg").symlink_to(Path(".store") / "face.jpg")
    expect["stored.jpg"] = Expected("symlink to a file no other listed path reaches", faces=1)

    # Files that cannot be indexed: failure records, the run goes on.
    write("sky.jpg", _encoded(Image.new("RGB", (200, 200), (120, 160, 200)), "JPEG"),
          Expected("an image without a face", kind="no_face", text="no face found"))
    corrupt = bytearray(data)
    noise = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
    corrupt[len(data) // 3 : len(data) // 3 + 400] = noise
    write("corrupt.jpg", bytes(corrupt), Expected("400 random bytes inside the JPEG's entropy-coded data",
                                                  kind="load_error", text="corrupt or truncated image"))
    write("truncated.jpg", data[: len(data) * 2 // 5], Expected("the first 40% of a JPEG", kind="load_error",
                                                                   text="truncated"))
    write("empty.jpg", b"", Expected("zero bytes", kind="load_error", text="empty file (0 bytes)"))
    write("text.jpg", b"this is not an image\n", Expected("text named .jpg", kind="load_error",
                                                           text="not a recognised image format"))
    write("huge.png", png_declaring(30000, 30000), Expected("a PNG header declaring 30000x30000",
                                                             kind="load_error", text="over the limit of"))
    with open(os.fsencode(root) + b"/bad\xff.jpg", "wb") as handle:  # a name that is not UTF-8
        handle.write(FACE_B.read_bytes())
    expect["bad\\xff.jpg"] = Expected("file name with the byte 0xff (not UTF-8)", kind="load_error",
                                      text="file name is not valid UTF-8")
    (root / "dead.jpg").symlink_to("nowhere.jpg")
    expect["dead.jpg"] = Expected("broken symlink", kind="load_error", text="broken symlink to nowhere.jpg")

    # What the reader does not list, each with its reason.
    (root / "loop").symlink_to(".")
    expect["loop"] = Expected("ln -s . loop", skipped=SKIP_LOOP, text="leads back to a folder above it")
    (root / "link.jpg").symlink_to("good.jpg")
    expect["link.jpg"] = Expected("symlink to good.jpg: one real file, listed once", skipped=SKIP_DUPLICATE,
                                  text="good.jpg")
    write("notes.txt", b"shot on holiday\n", Expected("a text file", skipped=SKIP_NOT_IMAGE, text=".txt"))
    write("README", b"no extension\n", Expected("no extension", skipped=SKIP_NOT_IMAGE, text="none"))
    write(".hidden.jpg", data, Expected("hidden file", skipped=SKIP_HIDDEN, text="file"))
    os.mkfifo(root / "pipe.jpg")
    expect["pipe.jpg"] = Expected("a fifo named .jpg (reading it would block)", skipped=SKIP_NOT_REGULAR)
    return expect


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.bad_inputs FOLDER", file=sys.stderr)
        return 2
    target = Path(argv[0])
    if target.exists():
        shutil.rmtree(target)
    expect = make_corpus(target)
    width = max(map(len, expect))
    for path, expected in sorted(expect.items()):
        print(f"{path:<{width}}  {expected.outcome:<60}  {expected.what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
