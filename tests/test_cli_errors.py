"""Every CLI command driven into its main error: one clean line, exit code 1, no crash.

Under CliRunner a crash leaves the output empty and ``result.exception`` set to the
exception itself, so the checks are on the exception type and the exit code; a
``"Traceback" not in output`` check alone could not fail.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from indexer.cli import main as face_index
from search.cli import main as face_search
from tests.conftest import CELEBA, PHOTOS
from training.cli import main as face_train


def assert_clean_error(result, *fragments: str) -> str:
    """Exit code 1 through click (SystemExit), one 'Error:' line that holds ``fragments``."""
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}\n{result.output}"
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture
def not_a_gallery(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return str(folder)


@pytest.fixture
def checkpoint_gone(celeba_gallery, tmp_path):
    """A gallery whose embedder checkpoint has moved since it was built."""
    gallery = tmp_path / "moved"
    shutil.copytree(celeba_gallery[0], gallery)
    info = json.loads((gallery / "gallery.json").read_text())
    config = info["pipeline"]["config"]
    config["embedder"], config["embedder_options"] = "timm-arcface", {"checkpoint": str(tmp_path / "gone" / "embedder.pt")}
    (gallery / "gallery.json").write_text(json.dumps(info))
    return str(gallery)


INDEX_ON_MISSING_GALLERY = [
    ["add", "{g}", str(PHOTOS / "group1.jpg")],
    ["remove", "{g}", "--face-id", "0"],
    ["sync", "{g}"],
    ["info", "{g}"],
]
SEARCH_ON_MISSING_GALLERY = [
    ["query", str(PHOTOS / "group1.jpg"), "--gallery", "{g}"],
    ["eval", "{g}"],
    ["report", str(PHOTOS / "group1.jpg"), "--gallery", "{g}", "--out", "{g}/r.html"],
    ["audit", "{g}"],
    ["serve", "--gallery", "{g}"],
    ["watch", "0", "--gallery", "{g}"],
]


@pytest.mark.parametrize("args", INDEX_ON_MISSING_GALLERY, ids=lambda a: a[0])
def test_face_index_on_a_missing_gallery(args, not_a_gallery):
    result = CliRunner().invoke(face_index, [a.format(g=not_a_gallery) for a in args])
    assert_clean_error(result, "is not a gallery", "gallery.json is missing")


def test_face_index_build_of_a_folder_that_is_no_gallery(not_a_gallery):
    assert_clean_error(CliRunner().invoke(face_index, ["build", not_a_gallery]), "run.json is missing")


@pytest.mark.parametrize("args", SEARCH_ON_MISSING_GALLERY, ids=lambda a: a[0])
def test_face_search_on_a_missing_gallery(args, not_a_gallery):
    result = CliRunner().invoke(face_search, [a.format(g=not_a_gallery) for a in args])
    assert_clean_error(result, "is not a gallery")


@pytest.mark.needs_data
@pytest.mark.parametrize("args", [
    ["query", str(PHOTOS / "group1.jpg"), "--gallery", "{g}"],
    ["report", str(PHOTOS / "group1.jpg"), "--gallery", "{g}", "--out", "{g}/r.html"],
    ["watch", str(PHOTOS / "group1.jpg"), "--gallery", "{g}", "--no-window", "--max-frames", "1"],
], ids=lambda a: a[0])
def test_face_search_with_a_missing_checkpoint(args, checkpoint_gone):
    """The pipeline is built lazily, at the first image: its error is still one clean line."""
    result = CliRunner().invoke(face_search, [a.format(g=checkpoint_gone) for a in args])
    assert_clean_error(result, "embedder.pt", "does not exist")


@pytest.mark.needs_data
def test_building_needs_no_models(checkpoint_gone):
    """Rebuilding the index reads the manifest only: a moved checkpoint does not matter."""
    result = CliRunner().invoke(face_index, ["build", checkpoint_gone, "--index", "hnsw"])
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.mark.needs_data
def test_wrong_format_and_unreadable_dataset(celeba_gallery, tmp_path):
    result = CliRunner().invoke(face_index, ["run", str(PHOTOS), "--format", "celeba", "--out", str(tmp_path / "g")])
    assert_clean_error(result, "celeba")
    result = CliRunner().invoke(face_index, ["run", str(CELEBA), "--format", "lfw", "--out", str(tmp_path / "g")])
    assert_clean_error(result)
    gallery = tmp_path / "copy"
    shutil.copytree(celeba_gallery[0], gallery)
    result = CliRunner().invoke(face_index, ["add", str(gallery), str(PHOTOS), "--format", "celeba"])
    assert_clean_error(result, "celeba")


@pytest.mark.parametrize("command", ["landmarks", "embedder", "detector"])
def test_face_train_on_a_folder_that_is_no_labels_dir(command, not_a_gallery, tmp_path):
    args = [command, not_a_gallery, "--out", str(tmp_path / "run")]
    if command == "detector":
        args += ["--format", "labels", "--convert-only"]
    result = CliRunner().invoke(face_train, args)
    assert_clean_error(result, "labels")


def test_face_train_label_of_an_unreadable_dataset(not_a_gallery, tmp_path):
    result = CliRunner().invoke(face_train, ["label", not_a_gallery, "--format", "lfw", "--out", str(tmp_path / "labels")])
    assert_clean_error(result)


def test_bot_without_a_token(not_a_gallery, monkeypatch):
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    result = CliRunner().invoke(face_search, ["bot", "--gallery", not_a_gallery])
    assert_clean_error(result, "TELEGRAM_BOT_TOKEN")


@pytest.mark.parametrize("args, flag, fragment", [
    (["--ray-address", "auto"], "--ray-address", "only with --engine ray"),
    (["--ray-embed-gpus", "2"], "--ray-embed-gpus", "only with --engine ray"),
    (["--engine", "ray", "--workers", "2"], "--workers", "is for the local engine"),
    (["--engine", "ray", "--embed-in", "main"], "--embed-in", "--ray-embed-gpus N"),
    (["--engine", "ray", "--ray-runtime-env", "[1]"], "--ray-runtime-env", "must be a JSON object"),
], ids=["address", "gpus", "workers", "embed-in", "runtime-env"])
def test_engine_options_that_do_not_go_together(args, flag, fragment, tmp_path):
    """Refused as usage errors (exit 2) before anything is read or written; Ray is not needed for that."""
    out = tmp_path / "g"
    result = CliRunner().invoke(face_index, ["run", str(CELEBA), "--format", "celeba", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert flag in result.output and fragment in result.output, result.output
    assert not out.exists()
