"""Every command has help with an example; the CLIs turn domain errors into clean messages."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from indexer.cli import main as face_index
from search.cli import main as face_search
from tests.conftest import CELEBA, PHOTOS


def _commands(group: click.Group):
    yield [], group
    for name, command in group.commands.items():
        yield [name], command


@pytest.mark.parametrize("group", [face_index, face_search], ids=["face-index", "face-search"])
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
    assert result.exit_code == 1 and "not a built gallery" in result.output


@pytest.mark.needs_data
def test_query_table_and_json(celeba_gallery, tmp_path):
    out, _ = celeba_gallery
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    query = CELEBA / "img_align_celeba" / "182638.jpg"
    runner = CliRunner()
    table = runner.invoke(face_search, ["query", str(query), str(bad), "--gallery", str(out), "-k", "3"])
    assert table.exit_code == 0, table.output
    assert "rank   cosine" in table.output and "error: not a recognised image format" in table.output
    result = runner.invoke(face_search, ["query", str(PHOTOS / "group1.jpg"), "--gallery", str(out), "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report) == 1 and len(report[0]["faces"]) >= 3
    assert all(len(f["matches"]) == 2 and len(f["landmarks"]) == 5 for f in report[0]["faces"])
    info = runner.invoke(face_index, ["info", str(out)])
    assert info.exit_code == 0 and json.loads(info.output)["counts"]["images"] == 300
