"""Bad and unusual image files: each is a failure record with a reason or a
correctly found face, and an index run over all of them completes."""

from __future__ import annotations

import io
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.images import ImageLoadError, load_image, load_image_bytes
from indexer import RunConfig, run_index
from tests.conftest import CELEBA

pytestmark = pytest.mark.needs_data

FACE = CELEBA / "img_align_celeba" / "182638.jpg"


def _face_rgb() -> np.ndarray:
    return np.asarray(Image.open(FACE).convert("RGB"))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A folder of awkward files; returns (folder, {name: expectation})."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    face = _face_rgb()
    data = FACE.read_bytes()
    expect = {}

    shutil.copy(FACE, folder / "good.jpg")
    expect["good.jpg"] = "face"

    corrupt = bytearray(data)
    rng = np.random.default_rng(0)
    corrupt[len(data) // 3 : len(data) // 3 + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    (folder / "corrupt.jpg").write_bytes(bytes(corrupt))
    expect["corrupt.jpg"] = "either"

    (folder / "truncated.jpg").write_bytes(data[: len(data) * 2 // 5])
    expect["truncated.jpg"] = "load"

    (folder / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = "load"

    (folder / "text.jpg").write_text("this is not an image\n")
    expect["text.jpg"] = "load"

    Image.fromarray(face).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expect["cmyk.jpg"] = "face"

    gray16 = (cv2.cvtColor(face, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257)
    Image.fromarray(gray16).save(folder / "gray16.png")
    expect["gray16.png"] = "face"

    cv2.imwrite(str(folder / "rgb16.png"), (face[:, :, ::-1].astype(np.uint16) * 257))
    expect["rgb16.png"] = "face"

    # Stored sideways; EXIF orientation 6 says "rotate 90 degrees clockwise to view".
    sideways = Image.fromarray(np.ascontiguousarray(np.rot90(face, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(folder / "exif-rotated.jpg", exif=exif.tobytes(), quality=95)
    expect["exif-rotated.jpg"] = "face"

    Image.new("1", (8000, 7000)).save(folder / "huge.png")  # 56 Mpx, a few kB on disk
    expect["huge.png"] = "load"

    Image.new("RGB", (200, 200), (120, 160, 200)).save(folder / "sky.jpg")
    expect["sky.jpg"] = "no_face"
    return folder, expect


def test_each_bad_file_gives_a_reason(bad_inputs):
    folder, _ = bad_inputs
    reasons = {}
    for name in ("truncated.jpg", "empty.jpg", "text.jpg", "huge.png"):
        with pytest.raises(ImageLoadError) as info:
            load_image(folder / name)
        reasons[name] = info.value.reason
        assert str(folder / name) in str(info.value)
    assert "truncated" in reasons["truncated.jpg"]
    assert "empty" in reasons["empty.jpg"]
    assert "not a recognised image" in reasons["text.jpg"]
    assert "over the limit" in reasons["huge.png"] and "56000000" in reasons["huge.png"]
    with pytest.raises(ImageLoadError, match="empty"):
        load_image_bytes(b"")
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(folder / "does-not-exist.jpg")


def test_conversions_to_rgb_uint8(bad_inputs):
    folder, _ = bad_inputs
    face = _face_rgb().astype(int)
    cmyk = load_image(folder / "cmyk.jpg")
    assert cmyk.dtype == np.uint8 and cmyk.shape == face.shape
    assert np.abs(cmyk.astype(int) - face).mean() < 8
    gray16 = load_image(folder / "gray16.png")
    gray = cv2.cvtColor(_face_rgb(), cv2.COLOR_RGB2GRAY).astype(int)
    assert gray16.shape == face.shape and np.array_equal(gray16[..., 0], gray16[..., 2])
    assert np.abs(gray16[..., 0].astype(int) - gray).max() <= 1  # scaled, not clipped to 255
    rgb16 = load_image(folder / "rgb16.png")
    assert np.abs(rgb16.astype(int) - face).max() <= 1
    exif = load_image(folder / "exif-rotated.jpg")
    assert exif.shape == face.shape  # orientation applied: upright again
    rgba = Image.fromarray(_face_rgb()).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert load_image_bytes(buf.getvalue()).min() == 255
    palette = Image.fromarray(_face_rgb()).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert load_image_bytes(buf.getvalue()).shape == face.shape


def test_exif_rotation_is_what_makes_the_face_findable(bad_inputs, pipeline):
    folder, _ = bad_inputs
    raw = np.asarray(Image.open(folder / "exif-rotated.jpg").convert("RGB"))  # orientation ignored
    assert pipeline(np.ascontiguousarray(raw)) == []
    faces = pipeline(load_image(folder / "exif-rotated.jpg"))
    assert len(faces) == 1
    upright = pipeline(load_image(FACE))[0]
    assert float(faces[0].embedding @ upright.embedding) > 0.97


def test_index_run_over_bad_inputs_completes_and_loses_nothing(bad_inputs, tmp_path):
    folder, expect = bad_inputs
    config = RunConfig(dataset_root=str(folder), format="folder", partition_size=4)
    summary = run_index(config, tmp_path / "g", workers=2, progress=False)
    assert summary.images == len(expect)
    manifest = pq.read_table(tmp_path / "g" / "manifest").to_pydict()
    failures = pq.read_table(tmp_path / "g" / "failures").to_pydict()
    with_face = set(manifest["path"])
    failed = dict(zip(failures["path"], zip(failures["stage"], failures["reason"])))
    assert with_face | set(failed) == set(expect)  # every file accounted for
    assert not with_face & set(failed)
    for name, outcome in expect.items():
        if outcome == "face":
            assert name in with_face, (name, failed.get(name))
        elif outcome == "load":
            assert failed[name][0] == "load", name
        elif outcome == "no_face":
            assert failed[name] == ("detect", "no face found")
    assert manifest["face_id"] == list(range(len(manifest["face_id"])))


def test_heic_and_avif_decode_to_the_same_face(tmp_path):
    from tests.bad_inputs import heic_bytes

    face = _face_rgb()
    image = Image.fromarray(face)
    (tmp_path / "face.heic").write_bytes(heic_bytes(image))
    image.save(tmp_path / "face.avif", quality=90)
    for name in ("face.heic", "face.avif"):
        decoded = load_image(tmp_path / name)
        assert decoded.shape == face.shape and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(int) - face.astype(int)).mean() < 6, name


def test_heic_without_pillow_heif_is_a_clear_image_error(monkeypatch, tmp_path):
    import sys

    import data.images as images
    from facesearch.errors import ImageError
    from tests.bad_inputs import heic_bytes

    data = heic_bytes(Image.fromarray(_face_rgb()))
    monkeypatch.setattr(images, "_heif_registered", False)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import pillow_heif now raises ImportError
    with pytest.raises(ImageError, match="pillow-heif is not installed"):
        load_image_bytes(data)
