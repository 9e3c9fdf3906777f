"""Wall time of changing a ~13k-face LFW gallery in place, against indexing it again.

Usage: python benchmarks/lifecycle.py [--gallery bench-out/lifecycle/lfw] [--workers 2] [--repeats 3]
           [--add-images 1000] [--big-identity George_W_Bush] [--small-identity Aaron_Peirsol]
           [--sync-changes 10] [--no-reindex] [--out bench-out/lifecycle/lifecycle.json]

Every operation is the real ``face-index`` command in a fresh process, timed with
time.perf_counter around the subprocess (Python start-up, imports and model loading
included), each on a fresh copy of the same base gallery (the copy is not timed):

- the base gallery: ``face-index run ../shared/data/lfw --format lfw --workers 2`` into
  GALLERY, skipped when GALLERY/gallery.json exists. When it runs, its time is the
  "full re-index"; otherwise the full index is run again into a scratch folder
  (``--no-reindex``: take the time recorded in GALLERY/../index_time.json instead);
- start-up: ``face-index --help``, and a no-op ``add`` of an image the gallery holds
  (lock, read every path and content hash, nothing embedded, nothing committed);
- ``add`` of 1 CelebA image (``--workers 0``) and of ADD_IMAGES CelebA test images copied
  into a scratch folder first (``--workers N``), from outside the dataset root; for
  scale, ``run`` of those same images into a new gallery of their own;
- ``remove --identity`` of a big and of a small identity;
- ``sync --workers N`` of a gallery whose dataset root is a writable copy of LFW's
  image tree (``cp -r`` of all 13,233 files into the scratch folder, timed apart; the
  gallery copy's gallery.json and run.json are pointed at it): once with nothing
  changed (every file is read and hashed), and after deleting, adding and modifying
  SYNC_CHANGES files each (with --workers N, and with --workers 0).

Prints a markdown table: operation, images and faces touched, runs, median (min-max) seconds,
and the ratio to the full re-index. The shared data is only ever read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))
LFW_ROOT = SHARED / "lfw"
CELEBA_IMAGES = SHARED / "celeba" / "img_align_celeba"
FIRST_TEST_IMAGE = "182638.jpg"  # CelebA's test split starts here


def face_index(*args: str, timeout: float = 3600) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``face-index ARGS`` in a fresh process; (seconds, result). Fails loudly."""
    cmd = [sys.executable, "-m", "indexer.cli", *args]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"face-index {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result


def index_dataset(dataset: Path, out: Path, workers: int) -> dict:
    seconds, result = face_index("run", str(dataset), "--format", "lfw", "--out", str(out), "--workers", str(workers),
                                 "--no-progress")
    info = json.loads((out / "gallery.json").read_text())
    rate = re.search(r"processed (\d+) images in ([\d.]+) s", result.stderr)
    return {"seconds": seconds, "images": info["counts"]["images"], "faces": info["counts"]["faces"],
            "processing_s": float(rate.group(2)) if rate else None}


def clone_gallery(base: Path, dst: Path, dataset_root: str | None = None) -> Path:
    """A copy of ``base``; with ``dataset_root``, its gallery.json and run.json name that root."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns(".lock"))
    if dataset_root is not None:
        old = json.loads((base / "gallery.json").read_text())["dataset"]["root"]
        for name in ("gallery.json", "run.json"):
            path = dst / name
            text = path.read_text()
            assert json.dumps(old) in text, f"{name} does not name {old}"
            path.write_text(text.replace(json.dumps(old), json.dumps(dataset_root)))
    return dst


def change(args: list[str]) -> tuple[float, dict]:
    """A change with --json: (seconds, ChangeResult as a dict)."""
    seconds, result = face_index(*args, "--json")
    return seconds, json.loads(result.stdout)


def measure(name: str, repeats: int, prepare, run) -> dict:  # noqa: ANN001 - prepare() -> gallery, run(gallery) -> (s, result)
    times, results = [], []
    for _ in range(repeats):
        gallery = prepare()
        seconds, result = run(gallery)
        times.append(seconds)
        results.append(result)
    first = results[0] or {}
    row = {"operation": name, "runs": repeats, "seconds": statistics.median(times), "all_seconds": times,
           "images_added": first.get("images_added", 0), "images_removed": first.get("images_removed", 0),
           "faces_added": first.get("faces_added", 0), "faces_removed": first.get("faces_removed", 0),
           "result": first}
    print(f"  {name}: {', '.join(f'{t:.1f}' for t in times)} s", file=sys.stderr, flush=True)
    return row


def make_sync_changes(copy_root: Path, count: int) -> dict:
    """Delete, add and modify ``count`` files each in the writable LFW copy (never the shared data)."""
    image_dir = copy_root / "lfw"
    assert SHARED not in copy_root.resolve().parents, "refusing to change the shared data"
    people = sorted(p.name for p in image_dir.iterdir() if p.is_dir())
    multi = [p for p in people if len(list((image_dir / p).iterdir())) >= 3]
    # deleted: the last image of `count` people with 3+ images; modified: the first image of
    # `count` others, overwritten (after an unlink, so no other link sees it) with another person's image
    deleted = [sorted((image_dir / p).iterdir())[-1] for p in multi[:count]]
    modified = [sorted((image_dir / p).iterdir())[0] for p in multi[count:2 * count]]
    donors = [sorted((image_dir / p).iterdir())[1] for p in multi[2 * count:3 * count]]
    for path in deleted:
        path.unlink()
    for path, donor in zip(modified, donors):
        data = donor.read_bytes()
        path.unlink()
        path.write_bytes(data)
    newcomer = image_dir / "Zz_New_Person"
    newcomer.mkdir()
    sources = sorted(p.name for p in CELEBA_IMAGES.iterdir() if p.name >= FIRST_TEST_IMAGE)[-count:]
    for n, name in enumerate(sources, 1):
        shutil.copyfile(CELEBA_IMAGES / name, newcomer / f"Zz_New_Person_{n:04d}.jpg")
    return {"deleted": len(deleted), "modified": len(modified), "added": len(sources)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--gallery", default="bench-out/lifecycle/lfw", help="The base LFW gallery (built if absent).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each operation but the full index (median reported).")
    parser.add_argument("--add-images", type=int, default=1000)
    parser.add_argument("--big-identity", default="George_W_Bush")
    parser.add_argument("--small-identity", default="Aaron_Peirsol")
    parser.add_argument("--sync-changes", type=int, default=10, help="Files deleted, added and modified each.")
    parser.add_argument("--no-reindex", action="store_true",
                        help="With an existing gallery, take the full index time it recorded instead of indexing again.")
    parser.add_argument("--scratch", default=None, help="Scratch folder [default: a temporary one, deleted after].")
    parser.add_argument("--out", default="bench-out/lifecycle/lifecycle.json")
    args = parser.parse_args()

    base = (REPO / args.gallery).resolve()
    time_file = base.parent / "index_time.json"
    scratch_ctx = tempfile.TemporaryDirectory(prefix="lifecycle-") if args.scratch is None else None
    scratch = Path(scratch_ctx.name if scratch_ctx else args.scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        full = None
        if not (base / "gallery.json").exists():
            print(f"indexing {LFW_ROOT} into {base} ...", file=sys.stderr, flush=True)
            shutil.rmtree(base, ignore_errors=True)
            full = index_dataset(LFW_ROOT, base, args.workers)
            full["when"] = "built by this run"
            time_file.write_text(json.dumps(full, indent=2) + "\n")
        elif args.no_reindex:
            full = json.loads(time_file.read_text())
            full["when"] = "recorded when the gallery was built"
        else:
            print("full re-index into the scratch folder ...", file=sys.stderr, flush=True)
            full = index_dataset(LFW_ROOT, scratch / "reindex", args.workers)
            full["when"] = "measured by this run"
            shutil.rmtree(scratch / "reindex")
        info = json.loads((base / "gallery.json").read_text())
        print(f"base gallery: {info['counts']['faces']} faces, {info['counts']['images']} images; "
              f"full index {full['seconds']:.1f} s ({full['when']})", file=sys.stderr, flush=True)

        work = scratch / "g"

        def fresh() -> Path:
            return clone_gallery(base, work)

        # start-up
        held = LFW_ROOT / "lfw" / args.small_identity / f"{args.small_identity}_0001.jpg"
        rows.append(measure("`face-index --help` (Python start-up, no gallery)", args.repeats, lambda: work,
                            lambda g: (face_index("--help")[0], None)))
        rows.append(measure("no-op `add` of an image already held", args.repeats, fresh,
                            lambda g: change(["add", str(g), str(held)])))

        # add
        celeba = sorted(p.name for p in CELEBA_IMAGES.iterdir() if p.name >= FIRST_TEST_IMAGE)
        if len(celeba) < args.add_images + 1:
            raise SystemExit(f"{CELEBA_IMAGES} has only {len(celeba)} test images")
        one = scratch / "celeba-1"
        one.mkdir()
        shutil.copyfile(CELEBA_IMAGES / celeba[0], one / celeba[0])
        many = scratch / f"celeba-{args.add_images}"
        (many / "celeba").mkdir(parents=True)  # one folder: also a --format folders dataset, for the row below
        for name in celeba[1:args.add_images + 1]:
            shutil.copyfile(CELEBA_IMAGES / name, many / "celeba" / name)
        rows.append(measure("`add` 1 image (--workers 0)", args.repeats, fresh,
                            lambda g: change(["add", str(g), str(one), "--identity", "celeba"])))
        rows.append(measure(f"`add` {args.add_images:,} images (--workers {args.workers})", args.repeats, fresh,
                            lambda g: change(["add", str(g), str(many), "--workers", str(args.workers)])))

        def index_many(g: Path) -> tuple[float, dict]:
            shutil.rmtree(scratch / "g-many", ignore_errors=True)
            seconds, _ = face_index("run", str(many), "--format", "folders", "--out", str(scratch / "g-many"),
                                    "--workers", str(args.workers), "--no-progress")
            counts = json.loads((scratch / "g-many" / "gallery.json").read_text())["counts"]
            return seconds, {"images_added": counts["images"], "faces_added": counts["faces"]}

        rows.append(measure(f"for scale: `run` of the same {args.add_images:,} images into a new gallery", args.repeats,
                            lambda: work, index_many))

        # remove
        for who in (args.big_identity, args.small_identity):
            rows.append(measure(f"`remove --identity {who}`", args.repeats, fresh,
                                lambda g, who=who: change(["remove", str(g), "--identity", who])))

        # sync, on a writable copy of the dataset
        copy_root = scratch / "lfw-copy"
        start = time.perf_counter()
        shutil.copytree(LFW_ROOT / "lfw", copy_root / "lfw")
        copy_seconds = time.perf_counter() - start
        synced = scratch / "g-sync"

        def fresh_sync() -> Path:
            return clone_gallery(base, synced, str(copy_root))

        rows.append(measure(f"`sync` (--workers {args.workers}), nothing changed", args.repeats, fresh_sync,
                            lambda g: change(["sync", str(g), "--workers", str(args.workers)])))
        changes = make_sync_changes(copy_root, args.sync_changes)
        for workers in (args.workers, 0):
            rows.append(measure(f"`sync` (--workers {workers}) after {changes['deleted']} deleted, "
                                f"{changes['added']} added, {changes['modified']} modified", args.repeats, fresh_sync,
                                lambda g, w=workers: change(["sync", str(g), "--workers", str(w)])))
        rows.append({"operation": f"full index (`run --workers {args.workers}`)", "runs": 1, "seconds": full["seconds"],
                     "all_seconds": [full["seconds"]], "images_added": full["images"], "images_removed": 0,
                     "faces_added": full["faces"], "faces_removed": 0, "result": None})
    finally:
        if scratch_ctx is not None:
            scratch_ctx.cleanup()

    print()
    print(f"Base gallery: {info['counts']['faces']:,} faces of {info['counts']['images']:,} LFW images. "
          f"Full index: {full['when']}. Copying LFW's image tree for the sync rows took {copy_seconds:.1f} s (not counted).")
    print()
    print("| operation | images added / removed | faces added / removed | runs | seconds: median (min-max) "
          "| x full index |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        touched_i = f"{row['images_added']:,} / {row['images_removed']:,}"
        touched_f = f"{row['faces_added']:,} / {row['faces_removed']:,}"
        spread = f" ({min(row['all_seconds']):.1f}-{max(row['all_seconds']):.1f})" if row["runs"] > 1 else ""
        print(f"| {row['operation']} | {touched_i} | {touched_f} | {row['runs']} | {row['seconds']:.1f}{spread} "
              f"| {row['seconds'] / full['seconds']:.3f} |")
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"full_index": full, "copy_seconds": copy_seconds, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
