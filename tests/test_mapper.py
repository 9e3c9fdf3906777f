"""The mapper runs the pipeline stage by stage over groups of decoded images:
the same results as image by image, failures kept to their image, memory bounded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from data.images import read_image
from data.records import ImageRecord
from embedder.pipeline import PipelineConfig
from indexer import mapper as mapper_module
from indexer.mapper import FaceMapper
from tests.conftest import CELEBA, LFW, PHOTOS

pytestmark = pytest.mark.needs_data


@pytest.fixture()
def dataset(tmp_path):
    """Small CelebA and LFW images, a large group photo, a corrupt file and a missing one."""
    names = []
    for src in sorted((CELEBA / "img_align_celeba").glob("18*.jpg"))[:10]:
        shutil.copy(src, tmp_path / src.name)
        names.append(src.name)
    shutil.copy(PHOTOS / "group1.jpg", tmp_path / "group1.jpg")
    names.insert(4, "group1.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    names.insert(7, "corrupt.jpg")
    names.insert(9, "missing.jpg")
    lfw = sorted((LFW / "lfw" / "George_W_Bush").glob("*.jpg"))[:4]
    for src in lfw:
        shutil.copy(src, tmp_path / src.name)
        names.append(src.name)
    return tmp_path, [ImageRecord(name) for name in names]


def test_stage_by_stage_equals_image_by_image(dataset, monkeypatch):
    root, records = dataset
    groups: list[int] = []
    stages = FaceMapper._stages

    def spy(self, group):  # noqa: ANN001, ANN202
        groups.append(len(group))
        return stages(self, group)

    monkeypatch.setattr(FaceMapper, "_stages", spy)
    mapper = FaceMapper(str(root), PipelineConfig(), max_pixels=50_000_000)
    prepared = mapper.prepare(records)
    assert [p.record.path for p in prepared] == [r.path for r in records]  # in order
    pipeline = mapper.pipeline
    for record, got in zip(records, prepared):
        if record.path in ("corrupt.jpg", "missing.jpg"):
            assert got.failure is not None and got.failure.stage == "load"
            continue
        image, digest = read_image(root / record.path)
        detections, crops = pipeline.prepare(image)
        assert got.failure is None and got.content_hash == digest and got.shape == image.shape[:2]
        assert [d.box for d in got.detections] == [d.box for d in detections]
        np.testing.assert_array_equal(got.crops, crops)
    assert len(prepared[4].detections) >= 3  # the group photo's faces
    # small images share groups; load failures close them
    assert max(groups) >= 3 and sum(groups) == len(records) - 2


def test_a_stage_error_fails_its_image_only(dataset, monkeypatch):
    root, records = dataset
    mapper = FaceMapper(str(root), PipelineConfig(), max_pixels=50_000_000)
    locate = type(mapper.pipeline).locate
    bad = records[2].path
    bad_shape = read_image(root / bad)[0].shape

    def flaky(self, image, boxes):  # noqa: ANN001, ANN202
        if image.shape == bad_shape and image.sum() == read_image(root / bad)[0].sum():
            raise RuntimeError("landmark model fell over")
        return locate(self, image, boxes)

    monkeypatch.setattr(type(mapper.pipeline), "locate", flaky)
    prepared = mapper.prepare(records)
    failure = prepared[2].failure
    assert failure is not None and failure.stage == "detect" and "landmark model fell over" in failure.reason
    assert prepared[2].content_hash is not None
    assert all(p.failure is None and len(p.detections) for i, p in enumerate(prepared)
               if i != 2 and p.record.path not in ("corrupt.jpg", "missing.jpg", "group1.jpg"))


def test_groups_hold_a_bounded_number_of_pixels(dataset, monkeypatch):
    root, records = dataset
    monkeypatch.setattr(mapper_module, "PHASE_PIXELS", 100_000)  # about two CelebA crops
    held: list[int] = []
    stages = FaceMapper._stages

    def spy(self, group):  # noqa: ANN001, ANN202
        held.append(sum(item.image.shape[0] * item.image.shape[1] for item in group))
        return stages(self, group)

    monkeypatch.setattr(FaceMapper, "_stages", spy)
    FaceMapper(str(root), PipelineConfig(), max_pixels=50_000_000).prepare(records)
    largest_image = max(read_image(root / r.path)[0].shape[0] * read_image(root / r.path)[0].shape[1]
                        for r in records if r.path not in ("corrupt.jpg", "missing.jpg"))
    assert max(held) < 100_000 + largest_image
