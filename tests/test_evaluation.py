"""face-search eval / report / audit on real galleries, and the pages in headless Chromium."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from click.testing import CliRunner

from data.lfw_pairs import read_pairs
from search import Gallery, Searcher
from search.audit import audit_gallery, write_audit_html
from search.calibration import Calibration
from search.cli import main as search_cli
from search.evaluate import evaluate, labelled_faces
from search.metrics import verification
from search.report import build_report
from tests.conftest import ARTIFACTS, CELEBA, LFW, PHOTOS

pytestmark = pytest.mark.needs_data


@pytest.fixture
def gallery_copy(celeba_gallery, tmp_path):
    """A copy of the session gallery, to calibrate or relabel without touching it."""
    out = tmp_path / "gallery"
    shutil.copytree(celeba_gallery[0], out)
    return out


def _png_ok(path) -> None:
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 10  # not a blank canvas


def test_eval_cli_calibrates_and_marks_matches(gallery_copy):
    result = CliRunner().invoke(search_cli, ["eval", str(gallery_copy), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    ver = report["verification"]
    assert [p["target_fpr"] for p in ver["operating_points"]] == [1e-2, 1e-3, 1e-4]
    thresholds = [p["threshold"] for p in ver["operating_points"]]
    assert thresholds == sorted(thresholds) and all(0 < t < 1 for t in thresholds)  # stricter FPR, higher threshold
    assert all(p["fpr"] <= p["target_fpr"] for p in ver["operating_points"])
    assert 0.95 < ver["roc_auc"] <= 1
    assert report["identification"]["rank1"] > 0.8 and 0 < report["identification"]["map@8"] <= 1
    # The figures are real PNGs, and eval.json lies beside them.
    for name in ("histogram", "roc"):
        _png_ok(report["figures"][name])
    assert json.loads((gallery_copy / "eval" / "eval.json").read_text())["faces"] == report["faces"]

    # The exact figures equal a brute-force computation on the same faces.
    gallery = Gallery.load(gallery_copy)
    faces = labelled_faces(gallery)
    s = faces.embeddings @ faces.embeddings.T
    i, j = np.triu_indices(len(s), k=1)
    same = faces.labels[i] == faces.labels[j]
    assert ver["genuine_pairs"] == same.sum() and ver["impostor_pairs"] == (~same).sum()
    impostor = np.sort(s[i, j][~same])[::-1]
    allowed = int(np.floor(1e-2 * len(impostor)))
    assert thresholds[0] == pytest.approx(float(impostor[allowed]), abs=1e-6)

    # The calibration is stored, survives a rebuild, and search marks matches by it.
    info = json.loads((gallery_copy / "gallery.json").read_text())
    calibration = Calibration.from_dict(info["calibration"])
    assert calibration.threshold == pytest.approx(thresholds[1]) and calibration.fpr == 1e-3
    assert calibration.uncertain_threshold == pytest.approx(thresholds[0]) and calibration.uncertain_fpr == 1e-2
    assert CliRunner().invoke(__import__("indexer.cli", fromlist=["main"]).main, ["build", str(gallery_copy)]).exit_code == 0
    assert json.loads((gallery_copy / "gallery.json").read_text())["calibration"] == info["calibration"]
    searcher = Searcher(gallery_copy)
    matches = searcher.search_vectors(faces.embeddings[:20], k=8)
    verdicts = {m.verdict for row in matches for m in row}
    assert "same" in verdicts and "different" in verdicts  # itself at cosine 1, strangers far down
    for row in matches:
        for m in row:
            expected = "same" if m.cosine > calibration.threshold else (
                "uncertain" if m.cosine > calibration.uncertain_threshold else "different")
            assert m.verdict == expected
    table = CliRunner().invoke(search_cli, ["query", str(PHOTOS / "group1.jpg"), "--gallery", str(gallery_copy)])
    assert table.exit_code == 0 and "verdict" in table.output and "different" in table.output


def test_eval_refuses_unlabelled_and_bad_fpr(gallery_copy, tmp_path):
    bad = CliRunner().invoke(search_cli, ["eval", str(gallery_copy), "--fpr", "2"])
    assert bad.exit_code != 0 and "between 0 and 1" in bad.output
    # Strip the identities: eval has nothing to measure, and says so.
    for part in sorted((gallery_copy / "manifest").glob("part-*.parquet")):
        table = pq.read_table(part)
        column = table.schema.get_field_index("identity")
        table = table.set_column(column, table.schema.field("identity"), pa.nulls(table.num_rows, pa.string()))
        pq.write_table(table, part)
    result = CliRunner().invoke(search_cli, ["eval", str(gallery_copy)])
    assert result.exit_code != 0 and "identity" in result.output and "Traceback" not in result.output


def test_eval_lfw_ten_fold(tmp_path):
    """A small LFW: 10 folds of 4 + 4 pairs from the real pairs.txt, indexed for real."""
    from indexer import RunConfig, run_index

    folds = read_pairs(LFW / "pairs.txt")
    lines, names = ["10 4"], set()
    for fold in folds:
        chosen = [p for p in fold if p.same][:4] + [p for p in fold if not p.same][:4]
        for p in chosen:
            lines.append(f"{p.name_a} {p.number_a} {p.number_b}" if p.same else f"{p.name_a} {p.number_a} {p.name_b} {p.number_b}")
            names.update({p.path_a, p.path_b})
    root = tmp_path / "lfw"
    for rel in names:
        (root / "lfw" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "lfw" / rel).symlink_to(LFW / "lfw" / rel)
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    run_index(RunConfig(dataset_root=str(root), format="lfw"), tmp_path / "g", workers=2, progress=False)
    result = evaluate(tmp_path / "g", lfw_pairs=root / "pairs.txt", fprs=(1e-2,))
    lfw = result.lfw
    assert lfw["pairs"] == 80 and lfw["folds"] == 10 and len(lfw["fold_accuracies"]) == 10
    assert lfw["accuracy"] >= 0.85  # dlib's network: ~98.6% on the full protocol
    assert 0.8 < lfw["mean_threshold"] < 1


def test_report_opens_in_chromium(gallery_copy, browser, tmp_path):
    CliRunner().invoke(search_cli, ["eval", str(gallery_copy)])
    gallery = Gallery.load(gallery_copy)
    indexed = set(gallery.meta.column("path").to_pylist())
    # queries: unseen CelebA images of indexed people, a folder of group photos, and an unreadable file
    listing = sorted(p.name for p in (CELEBA / "img_align_celeba").iterdir())
    unseen = [CELEBA / "img_align_celeba" / n for n in listing if f"img_align_celeba/{n}" not in indexed][-6:]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "report.html"
    result = CliRunner().invoke(
        search_cli, ["report", *map(str, unseen), str(PHOTOS), str(bad), "--gallery", str(gallery_copy), "--out", str(out), "-k", "8"])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch: opens offline
    assert html.count('class="item"') == len(unseen) + 6 + 1
    assert "cannot read" in html and "same person" in html
    seen = browser(out, ARTIFACTS / "report.png")
    # one query thumbnail + 8 matches per face
    faces = html.count("face query")
    assert faces >= len(unseen) + 6 * 3 and seen["images"] == faces * 9
    assert seen["broken"] == [] and seen["console_errors"] == []
    _png_ok(ARTIFACTS / "report.png")
    # The filter script works: typing a file name leaves one query shown.
    driver = seen["driver"]
    box = driver.find_element("id", "filter-text")
    box.send_keys(unseen[0].name)
    assert driver.find_element("id", "filter-count").text == f"1 of {len(unseen) + 7} shown"


def test_report_of_hundreds_of_queries(celeba_gallery, tmp_path):
    """200 query images: one page, each gallery thumbnail encoded once per face id."""
    from search.html import GalleryThumbnails

    searcher = Searcher(celeba_gallery[0])
    images = sorted((CELEBA / "img_align_celeba").iterdir())[-200:]
    summary = build_report(searcher, images, tmp_path / "big.html", k=8)
    assert summary.queries == 200 and summary.faces >= 190 and summary.errors == 0
    size = (tmp_path / "big.html").stat().st_size
    assert size < 12 * 2**20  # ~2000 thumbnails of a few kB
    assert isinstance(GalleryThumbnails(searcher.gallery)(0), str)


def _relabel(gallery_dir, old: str, new: str) -> None:
    for part in sorted((gallery_dir / "manifest").glob("part-*.parquet")):
        table = pq.read_table(part)
        ids = [new if v == old else v for v in table.column("identity").to_pylist()]
        table = table.set_column(table.schema.get_field_index("identity"), table.schema.field("identity"),
                                 pa.array(ids, pa.string()))
        pq.write_table(table, part)


def test_audit_finds_a_planted_mislabel(gallery_copy, browser, tmp_path):
    gallery = Gallery.load(gallery_copy)
    faces = labelled_faces(gallery)
    v = verification(faces.embeddings, faces.labels, fprs=(1e-2, 1e-3))
    calibration = Calibration(1e-3, v.points[1].threshold, 1e-2, v.points[0].threshold)
    clean = audit_gallery(gallery, calibration=calibration)
    flagged = {n.identity for n in clean.noisy}
    # Two identities whose faces agree among themselves and not with each other.
    members = {name: np.flatnonzero(faces.labels == name) for name in set(faces.labels)}
    candidates = sorted((n for n, m in members.items() if len(m) >= 2 and n not in flagged), key=lambda n: -len(members[n]))
    x = faces.embeddings
    pair = next((a, b) for a in candidates for b in candidates
                if a != b and (x[members[a]] @ x[members[b]].T).max() < calibration.uncertain_threshold)
    planted, target = pair
    planted_ids = {int(f) for f in faces.face_ids[members[planted]]}
    _relabel(gallery_copy, planted, target)  # every face of `planted` now claims to be `target`

    result = audit_gallery(Gallery.load(gallery_copy), calibration=calibration)
    noisy = {n.identity: n for n in result.noisy}
    assert target in noisy
    groups = [set(noisy[target].main)] + [set(s.face_ids) for s in noisy[target].suspects]
    assert planted_ids in groups  # the planted faces are exactly one group of their own
    assert set().union(*groups) == planted_ids | {int(f) for f in faces.face_ids[members[target]]}
    assert {n.identity for n in result.noisy} - {target} == flagged - {planted}  # nothing else changed

    out = write_audit_html(result, Gallery.load(gallery_copy), tmp_path / "audit.html")
    seen = browser(out, ARTIFACTS / "audit.png")
    assert seen["images"] > 0 and seen["broken"] == [] and seen["console_errors"] == []
    assert f"identity {target}:" in out.read_text() and "apart" in out.read_text()


def test_audit_finds_a_near_duplicate(gallery_copy, tmp_path):
    """The same photo indexed twice under another name is a near-duplicate across identities."""
    gallery = Gallery.load(gallery_copy)
    faces = labelled_faces(gallery)
    # Re-save face 0's photo (other bytes, the same picture) and add it as a new identity.
    first = gallery.row(int(faces.face_ids[0]))
    copies = tmp_path / "copies"
    copies.mkdir()
    Image.open(gallery.image_path(first["path"])).save(copies / "dup.jpg", quality=97)
    added = CliRunner().invoke(__import__("indexer.cli", fromlist=["main"]).main,
                               ["add", str(gallery_copy), str(copies / "dup.jpg"), "--identity", f"copy-of-{first['identity']}"])
    assert added.exit_code == 0 and "1 faces added" in added.output, added.output
    result = CliRunner().invoke(search_cli, ["audit", str(gallery_copy), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    dup = [d for d in report["near_duplicates"] if any(p.endswith("copies/dup.jpg") for p in d["paths"])]
    assert dup and dup[0]["mixed_identities"] and int(faces.face_ids[0]) in dup[0]["face_ids"]
    assert (gallery_copy / "audit.html").is_file()
