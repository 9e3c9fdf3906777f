"""Every command has help with an example; the CLIs turn domain errors into clean messages."""

from __future__ import annotations

import json

import click
import faiss
import pytest
from click.testing import CliRunner

from indexer.cli import main as face_index
from search.cli import main as face_search
from training.cli import main as face_train
from tests.conftest import CELEBA, PHOTOS


def _commands(group: click.Group):
    yield [], group
    for name, command in group.commands.items():
        yield [name], command


@pytest.mark.parametrize("group", [face_index, face_search, face_train], ids=["face-index", "face-search", "face-train"])
def test_every_command_has_help_with_an_example(group):
    runner = CliRunner()
    for args, command in _commands(group):
        result = runner.invoke(group, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        assert "Example:" in result.output, args
        assert command.help and command.help.strip(), args


def test_unknown_backend_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(face_index, ["run", str(tmp_path), "--format", "folder", "--out", str(tmp_path / "g"),
                                             "--detector", "retinaface"])
    assert result.exit_code == 1
    assert "unknown detector backend 'retinaface'" in result.output and "dlib-hog" in result.output


def test_not_a_gallery_is_a_clean_error(tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(b"not an image")
    result = CliRunner().invoke(face_search, ["query", str(image), "--gallery", str(tmp_path)])
    assert result.exit_code == 1 and "not a gallery" in result.output
    result = CliRunner().invoke(face_index, ["info", str(tmp_path)])
    assert result.exit_code == 1 and "not a gallery" in result.output


@pytest.mark.needs_data
def test_query_table_and_json(celeba_gallery, tmp_path):
    out, _ = celeba_gallery
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    query = CELEBA / "img_align_celeba" / "182638.jpg"
    runner = CliRunner()
    faiss.cvar.distance_compute_blas_threshold = 128000  # faiss's default
    table = runner.invoke(face_search, ["query", str(query), str(bad), "--gallery", str(out), "-k", "3"])
    assert table.exit_code == 0, table.output
    assert faiss.cvar.distance_compute_blas_threshold <= 32  # set once where the searching process starts
    assert "rank   cosine" in table.output and "error: not a recognised image format" in table.output
    result = runner.invoke(face_search, ["query", str(PHOTOS / "group1.jpg"), "--gallery", str(out), "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report) == 1 and len(report[0]["faces"]) >= 3
    assert all(len(f["matches"]) == 2 and len(f["landmarks"]) == 5 for f in report[0]["faces"])
    info = runner.invoke(face_index, ["info", str(out)])
    assert info.exit_code == 0 and json.loads(info.output)["counts"]["images"] == 300


def test_missing_trained_weights_are_clean_errors(tmp_path):
    result = CliRunner().invoke(face_index, ["run", str(tmp_path), "--format", "folder", "--out", str(tmp_path / "g"),
                                             "--embedder", "timm-arcface", "--embedder-option", f"checkpoint={tmp_path}/none.pt"])
    assert result.exit_code == 1 and "face-train embedder" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(face_index, ["run", str(tmp_path), "--format", "folder", "--out", str(tmp_path / "g"),
                                          "--embedder-option", "no-equals-sign"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output


@pytest.mark.needs_data
def test_face_train_detector_pseudo_labels_a_plain_folder(tmp_path):
    """A folder without annotations is labelled by the default pipeline, then converted."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("group1.jpg", "group2.jpg", "group3.jpg"):
        (photos / name).symlink_to(PHOTOS / name)
    result = CliRunner().invoke(face_train, ["detector", str(photos), "--format", "folder", "--out", str(tmp_path / "run"),
                                             "--convert-only", "--val-fraction", "0.34"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "labels" / "run.json").is_file()
    labels = sorted((tmp_path / "run" / "data" / "labels").rglob("*.txt"))
    assert len(labels) == 3 and sum(len(p.read_text().splitlines()) for p in labels) >= 6  # several faces a photo
