"""Dataset readers on the real CelebA root and LFW in ../shared/data, and on small trees."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from data.lfw_pairs import read_pairs
from data.readers import DatasetError, read_celeba, read_dataset, read_folder, read_folders, read_lfw
from tests.conftest import CELEBA, LFW

pytestmark = pytest.mark.needs_data


def _official(path: Path) -> dict[str, str]:
    rows = {}
    for line in path.read_bytes().decode().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].endswith(".jpg"):
            rows[parts[0]] = parts[1]
    return rows


def test_celeba_identities_and_splits_match_official_files(caplog):
    identities = _official(CELEBA / "Anno" / "identity_CelebA.txt")
    partitions = _official(CELEBA / "Eval" / "list_eval_partition.txt")
    on_disk = {p.name for p in (CELEBA / "img_align_celeba").iterdir()}
    with caplog.at_level(logging.WARNING):
        listing = read_celeba(CELEBA)
    assert len(identities) == 202_599
    assert len(listing) == len(on_disk & set(identities)) == 4627
    assert listing.missing == 202_599 - 4627
    split_names = {"0": "train", "1": "val", "2": "test"}
    for record in listing.records:
        name = record.path.split("/")[-1]
        assert record.path == f"img_align_celeba/{name}"
        assert record.identity == identities[name]
        assert record.split == split_names[partitions[name]]
    # The missing files are reported once, not once per file.
    warnings = [r for r in caplog.records if "missing on disk" in r.getMessage()]
    assert len(warnings) == 1 and "197972" in warnings[0].getMessage()


def test_celeba_split_filter_and_landmark_annotations():
    test = read_celeba(CELEBA, split="test")
    assert len(test) == 4595
    assert {r.split for r in test.records} == {"test"}
    assert len({r.identity for r in test.records}) == 253
    assert all(int(r.identity) % 4 == 0 for r in test.records)
    train = read_celeba(CELEBA, split="train")
    first = train.records[0]
    assert first.path.endswith("000001.jpg")
    # list_landmarks_align_celeba.txt row 000001: 69 109 106 113 77 142 73 152 108 154
    assert first.annotations["landmarks"] == ((69, 109), (106, 113), (77, 142), (73, 152), (108, 154))


def test_celeba_parses_crlf_count_and_header_lines(tmp_path):
    (tmp_path / "Anno").mkdir()
    (tmp_path / "Eval").mkdir()
    (tmp_path / "img_celeba").mkdir()
    for name in ("000001.jpg", "000002.jpg"):
        (tmp_path / "img_celeba" / name).write_bytes(b"x")
    (tmp_path / "Anno" / "identity_CelebA.txt").write_bytes(b"000001.jpg 7\r\n000002.jpg 9\r\n000003.jpg 7\r\n")
    (tmp_path / "Eval" / "list_eval_partition.txt").write_bytes(b"000001.jpg 0\r\n000002.jpg 2\r\n000003.jpg 1\r\n")
    (tmp_path / "Anno" / "list_bbox_celeba.txt").write_bytes(
        b"3\r\nimage_id x_1 y_1 width height\r\n000001.jpg    95  71 226 313\r\n000002.jpg 72 94 221 306\r\n"
    )
    (tmp_path / "Anno" / "list_landmarks_celeba.txt").write_bytes(
        b"3\r\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y\r\n"
        b"000001.jpg 165 184 244 176 196 249 194 271 266 260\r\n"
    )
    listing = read_celeba(tmp_path, split="all")
    assert [r.identity for r in listing.records] == ["7", "9"]
    assert [r.split for r in listing.records] == ["train", "test"]
    assert listing.missing == 1
    assert listing.records[0].annotations["bbox"] == (95, 71, 95 + 226, 71 + 313)
    assert listing.records[0].annotations["landmarks"][4] == (266, 260)
    assert "landmarks" not in listing.records[1].annotations
    assert len(read_celeba(tmp_path, split="val")) == 0
    with pytest.raises(DatasetError, match="unknown split"):
        read_celeba(tmp_path, split="dev")


def test_lfw_reader_and_pairs():
    listing = read_lfw(LFW)
    assert len(listing) == 13233
    assert len({r.identity for r in listing.records}) == 5749
    assert listing.records[0].path.startswith("lfw/")
    folds = read_pairs(LFW / "pairs.txt")
    assert len(folds) == 10
    for fold in folds:
        assert len(fold) == 600
        assert sum(p.same for p in fold) == 300
        assert all(p.same for p in fold[:300]) and not any(p.same for p in fold[300:])
    first = folds[0][0]
    assert (first.name_a, first.number_a, first.number_b) == ("Abel_Pacheco", 1, 4)
    assert first.path_a == "Abel_Pacheco/Abel_Pacheco_0001.jpg"
    images = {r.path for r in listing.records}
    assert all(f"lfw/{p.path_a}" in images and f"lfw/{p.path_b}" in images for fold in folds for p in fold)


def test_folder_readers(tmp_path):
    for rel in ("alice/a1.jpg", "alice/trip/a2.PNG", "bob/b1.jpeg", "bob/.hidden.jpg", "bob/notes.txt", "loose.jpg"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    folders = read_folders(tmp_path)
    assert [(r.path, r.identity) for r in folders.records] == [
        ("alice/a1.jpg", "alice"), ("alice/trip/a2.PNG", "alice"), ("bob/b1.jpeg", "bob"),
    ]
    plain = read_folder(tmp_path)
    assert [r.path for r in plain.records] == ["alice/a1.jpg", "alice/trip/a2.PNG", "bob/b1.jpeg", "loose.jpg"]
    assert all(r.identity is None for r in plain.records)
    with pytest.raises(DatasetError, match="unknown dataset format"):
        read_dataset(tmp_path, "imagenet")
    with pytest.raises(DatasetError, match="has no splits"):
        read_dataset(tmp_path, "folder", split="test")
    with pytest.raises(DatasetError, match="not a CelebA root"):
        read_dataset(tmp_path, "celeba")
