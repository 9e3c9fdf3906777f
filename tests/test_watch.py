"""face-search watch on a short video made from real CelebA faces."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from search import Gallery
from search.cli import main as search_cli
from tests.conftest import CELEBA

pytestmark = pytest.mark.needs_data


def _video(path, images, size=(320, 320), repeat=3) -> list[np.ndarray]:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    frames = []
    for image_path in images:
        image = cv2.imread(str(image_path))
        frame = np.full((size[1], size[0], 3), 90, np.uint8)
        h, w = image.shape[:2]
        scale = min(size[0] / w, size[1] / h) * 0.8
        image = cv2.resize(image, (int(w * scale), int(h * scale)))
        y, x = (size[1] - image.shape[0]) // 2, (size[0] - image.shape[1]) // 2
        frame[y:y + image.shape[0], x:x + image.shape[1]] = image
        for _ in range(repeat):
            writer.write(frame)
            frames.append(frame)
    writer.release()
    return frames


def test_watch_writes_an_annotated_video(celeba_gallery, tmp_path):
    gallery = Gallery.load(celeba_gallery[0])
    paths = gallery.meta.column("path").to_pylist()
    identities = gallery.meta.column("identity").to_pylist()
    # four indexed faces of two different people: the labels must name them
    chosen = [paths[0], paths[1], paths[50], paths[51]]
    source = tmp_path / "clip.mp4"
    frames = _video(source, [CELEBA / p for p in chosen])
    out = tmp_path / "labelled.mp4"
    result = CliRunner().invoke(search_cli, ["watch", str(source), "--gallery", str(celeba_gallery[0]),
                                             "--out", str(out), "--every", "3", "--no-window"])
    assert result.exit_code == 0, result.output
    assert f"{len(frames)} frames" in result.output
    for identity in {identities[0], identities[50]}:
        assert str(identity) in result.output  # the indexed people are named
    capture = cv2.VideoCapture(str(out))
    written = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        written.append(frame)
    assert len(written) == len(frames)
    # Boxes and labels are drawn: many pixels differ from the source frame beyond codec noise.
    changed = [float((np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 80).mean()) for a, b in zip(written, frames)]
    assert min(changed) > 0.005


def test_watch_bad_source(celeba_gallery, tmp_path):
    missing = CliRunner().invoke(search_cli, ["watch", str(tmp_path / "nope.mp4"), "--gallery", str(celeba_gallery[0])])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    result = CliRunner().invoke(search_cli, ["watch", str(junk), "--gallery", str(celeba_gallery[0]), "--no-window"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, repr(result.exception)
    assert result.output.startswith("Error:") or "\nError:" in result.output
