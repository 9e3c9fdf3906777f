"""Dataset readers on the real CelebA root and LFW in ../shared/data, and on small trees."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from data.lfw_pairs import read_pairs
from data.readers import DatasetError, read_celeba, read_dataset, read_folder, read_folders, read_lfw
from data.records import (
    LOAD_ERROR, SKIP_DUPLICATE, SKIP_HIDDEN, SKIP_LOOP, SKIP_NAME_CLASH, SKIP_NO_IDENTITY, SKIP_NOT_IMAGE,
    SKIP_NOT_REGULAR, SKIP_SAME_FOLDER, SKIP_UNREADABLE, skipped_summary,
)
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
    for name in ("000001.jpg", "000002.jpg", "999999.jpg"):
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
    assert [(s.path, s.reason) for s in listing.skipped] == [("img_celeba/999999.jpg", SKIP_NO_IDENTITY)]
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
    assert [(s.path, s.reason, s.detail) for s in folders.skipped] == [
        ("bob/.hidden.jpg", SKIP_HIDDEN, "file"), ("bob/notes.txt", SKIP_NOT_IMAGE, ".txt"),
        ("loose.jpg", SKIP_NO_IDENTITY, "not in an identity folder"),
    ]
    plain = read_folder(tmp_path)
    assert [r.path for r in plain.records] == ["alice/a1.jpg", "alice/trip/a2.PNG", "bob/b1.jpeg", "loose.jpg"]
    assert all(r.identity is None for r in plain.records)
    assert [s.path for s in plain.skipped] == ["bob/.hidden.jpg", "bob/notes.txt"]
    assert skipped_summary(plain.skipped) == "skipped 2 paths: 1 hidden, 1 not an image by extension (.txt)"
    with pytest.raises(DatasetError, match="unknown dataset format"):
        read_dataset(tmp_path, "imagenet")
    with pytest.raises(DatasetError, match="has no splits"):
        read_dataset(tmp_path, "folder", split="test")
    with pytest.raises(DatasetError, match="not a CelebA root"):
        read_dataset(tmp_path, "celeba")


def _touch(root: Path, rel: str, data: bytes = b"x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_symlink_loops_and_links_list_each_real_file_once(tmp_path, caplog):
    root = tmp_path / "d"
    _touch(root, "a.jpg")
    _touch(root, "sub/b.jpg")
    (root / "loop").symlink_to(".")  # ln -s . loop
    (root / "sub" / "up").symlink_to("..")
    (root / "alias.jpg").symlink_to("a.jpg")  # sorts after its target: a.jpg is kept
    (root / "0first.jpg").symlink_to("sub/b.jpg")  # sorts before its target: the link's path is kept
    (root / "zz").symlink_to("sub")  # the same folder twice, not a loop
    os.link(root / "a.jpg", root / "hard.jpg")
    outside = _touch(tmp_path, "elsewhere/c.jpg")
    (root / "out.jpg").symlink_to(outside)  # a symlink to a file the walk does not see otherwise: listed
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        listing = read_folder(root)
    assert [r.path for r in listing.records] == ["0first.jpg", "a.jpg", "out.jpg"]
    assert {s.path: (s.reason, s.detail) for s in listing.skipped} == {
        "alias.jpg": (SKIP_DUPLICATE, "a.jpg"),
        "hard.jpg": (SKIP_DUPLICATE, "a.jpg"),
        "loop": (SKIP_LOOP, "leads back to a folder above it"),
        "sub/b.jpg": (SKIP_DUPLICATE, "0first.jpg"),
        "sub/up": (SKIP_LOOP, "leads back to a folder above it"),
        "zz": (SKIP_SAME_FOLDER, "sub"),
    }
    loops = [r for r in caplog.records if "symlink loop" in r.getMessage()]
    assert len(loops) == 2 and all(r.levelno == logging.WARNING for r in loops)
    assert skipped_summary(listing.skipped) == (
        "skipped 6 paths: 3 duplicates of listed files (symlinks or hard links), 2 symlink loops, "
        "1 folder reached twice (symlink)"
    )
    assert read_folder(root) == listing  # the same on every run


def test_one_file_under_two_identity_folders_is_two_labels(tmp_path):
    root = tmp_path / "d"
    _touch(root, "alice/group.jpg")
    (root / "bob").mkdir()
    (root / "bob" / "group.jpg").symlink_to("../alice/group.jpg")
    (root / "alice" / "link.jpg").symlink_to("group.jpg")
    (root / "alice" / "me").symlink_to("../alice")  # a loop inside an identity folder
    listing = read_folders(root)
    assert [(r.path, r.identity) for r in listing.records] == [("alice/group.jpg", "alice"), ("bob/group.jpg", "bob")]
    assert [(s.path, s.reason) for s in listing.skipped] == [("alice/link.jpg", SKIP_DUPLICATE), ("alice/me", SKIP_LOOP)]


def test_names_that_are_not_utf8_are_listed_escaped_and_marked(tmp_path):
    base = os.fsencode(tmp_path)
    os.makedirs(base + b"/f/alice")
    os.makedirs(base + b"/f/caf\xe9")
    for name in (b"/f/alice/ok.jpg", b"/f/alice/bad\xff.jpg", b"/f/caf\xe9/x.jpg", b"/f/alice/odd\xfe.txt"):
        with open(base + name, "wb") as handle:
            handle.write(b"x")
    folder = read_folder(tmp_path / "f")
    by_path = {r.path: r for r in folder.records}
    assert sorted(by_path) == ["alice/bad\\xff.jpg", "alice/ok.jpg", "caf\\xe9/x.jpg"]
    assert by_path["alice/bad\\xff.jpg"].annotations[LOAD_ERROR] == (
        "file name is not valid UTF-8 (shown with \\x escapes); rename the file")
    assert "folder name is not valid UTF-8" in by_path["caf\\xe9/x.jpg"].annotations[LOAD_ERROR]
    assert LOAD_ERROR not in by_path["alice/ok.jpg"].annotations
    assert [s.path for s in folder.skipped] == ["alice/odd\\xfe.txt"]
    for listing in (folder, read_folders(tmp_path / "f")):
        for text in [r.path for r in listing.records] + [r.identity or "" for r in listing.records]:
            text.encode("utf-8")  # valid UTF-8: Parquet and JSON can hold it
    assert {r.identity for r in read_folders(tmp_path / "f").records} == {"alice", "caf\\xe9"}
    assert read_folder(tmp_path / "f") == folder  # stable across runs: resume and sync see the same paths

    # A file literally named with the escape text keeps its name; the undecodable one that would
    # take the same name is skipped, never listed twice under one path.
    (tmp_path / "f" / "alice" / "bad\\xff.jpg").write_bytes(b"y")
    clash = read_folder(tmp_path / "f")
    assert [r.path for r in clash.records].count("alice/bad\\xff.jpg") == 1
    assert LOAD_ERROR not in {r.path: r for r in clash.records}["alice/bad\\xff.jpg"].annotations
    assert (("alice/bad\\xff.jpg", SKIP_NAME_CLASH) in [(s.path, s.reason) for s in clash.skipped])

    lfw = tmp_path / "lfw-root"
    _touch(lfw, "lfw/Ann/Ann_0001.jpg")
    with open(os.fsencode(lfw) + b"/lfw/Ann/Ann_\xff.jpg", "wb") as handle:
        handle.write(b"x")
    listing = read_lfw(lfw)
    assert [(r.path, r.identity, LOAD_ERROR in r.annotations) for r in listing.records] == [
        ("lfw/Ann/Ann_0001.jpg", "Ann", False), ("lfw/Ann/Ann_\\xff.jpg", "Ann", True),
    ]


def test_unreadable_folders_fifos_and_broken_links_are_counted(tmp_path, monkeypatch, caplog):
    root = tmp_path / "d"
    _touch(root, "a.jpg")
    _touch(root, "locked/b.jpg")
    os.mkfifo(root / "pipe.jpg")  # opening it would block the worker forever
    (root / "dead.jpg").symlink_to("nowhere.jpg")
    real_scandir = os.scandir

    def scandir(path):  # root cannot make a folder unreadable with chmod: simulate EACCES
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="data.readers"):
        listing = read_folder(root)
    assert [(r.path, r.annotations.get(LOAD_ERROR)) for r in listing.records] == [
        ("a.jpg", None), ("dead.jpg", "broken symlink to nowhere.jpg (No such file or directory)"),
    ]
    assert [(s.path, s.reason, s.detail) for s in listing.skipped] == [
        ("locked", SKIP_UNREADABLE, "Permission denied"), ("pipe.jpg", SKIP_NOT_REGULAR, "not a regular file"),
    ]
    assert any("cannot read folder" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert skipped_summary(listing.skipped) == (
        "skipped 2 paths: 1 not a regular file (fifo, socket, device), 1 unreadable folder")
    monkeypatch.setattr(os, "scandir", lambda path: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(DatasetError, match="cannot read .*Permission denied"):
        read_folder(root)
