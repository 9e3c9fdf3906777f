"""SIGKILL soak: kill face-index run / add / remove / sync at random moments, check what is left.

Usage: python benchmarks/soak.py [--trials 20] [--seed 0] [--workers 2] [--operations run add remove sync]
           [--window 0 1] [--aim anywhere|commit] [--max-minutes 45] [--work DIR] [--out FILE]

The data: a folder-per-person copy of 10 LFW people x 6 images (60 images) in a
scratch folder, indexed once (``face-index run --format folders --partition-size 10``);
that run is also the clean reference for ``run``. Each operation is first run
uninterrupted, twice, on copies (both must leave the same state; D seconds is the
shorter of the two times). Then, TRIALS times, the real command starts in
its own process group, and the whole group (workers included) gets SIGKILL at a
moment drawn uniformly from [0, D] (``--window LO HI``: from [LO*D, HI*D]); a command
that ends before its moment is counted as "finished". Most such moments fall in
start-up and model loading; ``--aim commit`` aims at the commit instead (for add,
remove and sync, D is then the time from the first file the change writes to its exit,
and moments count from that file's appearance):

- ``run``: into an empty folder; killed, then rerun to completion. Identical when the
  manifest and failure tables (the files gallery.json lists, in order) equal the clean
  run's, and so does the gallery's state (generation, face ids, paths, identities,
  embeddings, index vectors, failures).
- ``add`` (5 images of a person not in the dataset, from outside it, ``--identity``),
  ``remove --identity Laura_Bush`` (her folder is deleted from that operation's dataset
  copy, so the gallery afterwards matches its dataset), ``sync --workers W`` (a person
  deleted, one added, one image's content replaced): each trial starts from the same
  "before" gallery. After the kill the gallery must open (search.gallery.Gallery.load)
  and its state must equal exactly the state before or the state an uninterrupted run
  of the same change left on a copy ("after"). Then the change is completed (the
  command rerun when the gallery is still "before"), a no-op writer session cleans what
  the killed process left, and the state must equal "after", with no file on disk that
  gallery.json does not list and no temporary.

Prints one line per operation ("N/N identical") and a summary line. Bounded: every
command has a timeout, and no trial starts after --max-minutes. The seed fixes the
kill moments (as fractions of D); the timing of the machine does the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FACESEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))
LFW_IMAGES = SHARED / "lfw" / "lfw"

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

PEOPLE = ["Arnold_Schwarzenegger", "Colin_Powell", "Gloria_Macapagal_Arroyo", "Jean_Chretien", "John_Ashcroft",
          "Junichiro_Koizumi", "Laura_Bush", "Lleyton_Hewitt", "Serena_Williams", "Vladimir_Putin"]
PER_PERSON = 6
NEWCOMER = "Tony_Blair"      # added from outside the dataset
ERASED = "Laura_Bush"        # removed
VANISHED = "Jean_Chretien"   # deleted from the sync dataset
ARRIVING = "Aaron_Peirsol"   # new in the sync dataset
CHANGED = "Serena_Williams"  # one image's content replaced in the sync dataset
COMMAND_TIMEOUT = 300


def copy_people(root: Path, people: list[str], per_person: int = PER_PERSON) -> None:
    for person in people:
        (root / person).mkdir(parents=True, exist_ok=True)
        for image in sorted((LFW_IMAGES / person).iterdir())[:per_person]:
            shutil.copyfile(image, root / person / image.name)


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "indexer.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_cli(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    return time.perf_counter() - start, result


def must(cmd: list[str]) -> float:
    seconds, result = run_cli(cmd)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def clone_gallery(src: Path, dst: Path, old_root: Path | None = None, new_root: Path | None = None) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    if new_root is not None:
        for name in ("gallery.json", "run.json"):
            path = dst / name
            text = path.read_text()
            assert json.dumps(str(old_root)) in text
            path.write_text(text.replace(json.dumps(str(old_root)), json.dumps(str(new_root))))
    return dst


def state(gallery: Path) -> dict:
    """Everything a gallery answers with (as tests/test_lifecycle.py compares it)."""
    from search.gallery import Gallery

    g = Gallery.load(gallery)
    table = g.read_columns(["face_id", "path", "identity", "face_index", "embedding"])
    embeddings = g.embeddings()
    failures = sorted(p for f in g.layout.failure_files(g.info) for p in pq.read_table(f).column("path").to_pylist())
    ids = table.column("face_id").to_numpy()
    vectors = np.stack([g.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, g.dim))
    return {
        "generation": g.generation,
        "faces": list(zip(ids.tolist(), table.column("path").to_pylist(), table.column("identity").to_pylist(),
                          table.column("face_index").to_pylist())),
        "embeddings": embeddings.tobytes(),
        "index": vectors.astype(np.float32).tobytes(),
        "failures": failures,
    }


def tables(gallery: Path) -> dict:
    """The manifest and failure tables of the files gallery.json lists, in order."""
    from indexer.layout import GalleryLayout

    layout = GalleryLayout(gallery)
    info = layout.read_info()
    out = {}
    for name, files in (("manifest", layout.manifest_files(info)), ("failures", layout.failure_files(info))):
        parts = [pq.read_table(f) for f in files]
        out[name] = pa.concat_tables(parts).to_pydict() if parts else {}
    return out


def leftovers(gallery: Path) -> list[str]:
    """Files on disk that the committed generation does not list, and temporaries."""
    from indexer.layout import GalleryLayout

    layout = GalleryLayout(gallery)
    info = layout.read_info()
    listed = {str(p) for p in layout.manifest_files(info) + layout.failure_files(info)} | {str(layout.index_path(info))}
    on_disk = {str(p) for p in list(gallery.glob("manifest/*.parquet")) + list(gallery.glob("failures/*.parquet"))
               + list(gallery.glob("index*.faiss"))}
    extra = sorted(on_disk - listed)
    extra += sorted(str(p) for p in gallery.rglob(".*.tmp-*"))
    if layout.enrolled_dir.is_dir():
        extra += sorted(str(p) for p in layout.enrolled_dir.iterdir())
    return [os.path.relpath(p, gallery) for p in extra]


def clean_up(gallery: Path) -> None:
    """A writer session that changes nothing: what every next writer does first."""
    from indexer.lifecycle import writing

    with writing(gallery, "soak: clean-up"):
        pass


def commit_started(gallery: Path, generation: int):  # noqa: ANN201 - a () -> bool
    """A test of whether the writer of generation+1 has begun its commit: the first file it
    writes (a part, the index, gallery.json, each first as a temporary) is on disk."""
    mark = f"{generation + 1:06d}"
    folders = (gallery, gallery / "manifest", gallery / "failures")

    def check() -> bool:
        for folder in folders:
            try:
                with os.scandir(folder) as entries:
                    if any(mark in e.name or ".tmp-" in e.name for e in entries):
                        return True
            except FileNotFoundError:
                continue
        return False

    return check


def wait_for(proc: subprocess.Popen, started) -> float | None:  # noqa: ANN001
    """Poll until ``started()`` (returns when, perf_counter) or the process ends (None)."""
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        if started():
            return time.perf_counter()
        time.sleep(0.002)
    return None


def timed_commit(cmd: list[str], started) -> tuple[float, float]:  # noqa: ANN001
    """Run ``cmd`` uninterrupted; (seconds in all, seconds from the commit's first file to the exit)."""
    begin = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = wait_for(proc, started)
    proc.wait(timeout=COMMAND_TIMEOUT)
    end = time.perf_counter()
    if proc.returncode != 0 or seen is None:
        raise SystemExit(f"{' '.join(cmd[2:])}: exit {proc.returncode}, commit seen: {seen is not None}")
    return end - begin, end - seen


def kill_at(cmd: list[str], delay: float, started=None) -> str:  # noqa: ANN001
    """Start ``cmd`` in its own process group and SIGKILL the group after ``delay`` s (counted
    from when ``started()`` first holds, when given). Returns "killed" or "finished" (exit 0
    before the moment; any other exit raises)."""
    with tempfile.TemporaryFile() as log:  # not a pipe: a full pipe would stall the command
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=log)
        try:
            if started is not None:
                wait_for(proc, started)
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        else:
            log.seek(0)
            stderr = log.read().decode(errors="replace")
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[2:])} failed before its kill ({proc.returncode}): {stderr[-2000:]}")
            return "finished"
        deadline = time.monotonic() + 10  # workers of the group: gone before the next writer starts
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
    return "killed"


@dataclass
class Tally:
    name: str
    duration: float = 0.0
    trials: int = 0
    identical: int = 0  # change: before-or-after after the kill AND after once completed; run: identical after resume
    outcomes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


def soak_change(tally: Tally, cmd_for, before_dir: Path, work: Path, trials: int, fractions,  # noqa: ANN001
                aim: str) -> None:
    """cmd_for(gallery) -> argv. Runs the trials of one change on copies of ``before_dir``."""
    before = state(before_dir)
    generation = before["generation"]
    durations, afters = [], []
    for n in range(2):  # twice: the change must be deterministic; the shorter time bounds the kill moments
        reference = clone_gallery(before_dir, work / f"{tally.name}-after{n}")
        if aim == "commit":
            durations.append(timed_commit(cmd_for(reference), commit_started(reference, generation))[1])
        else:
            durations.append(must(cmd_for(reference)))
        clean_up(reference)
        afters.append(state(reference))
    tally.duration = min(durations)
    after = afters[0]
    if after == before:
        raise SystemExit(f"{tally.name}: the uninterrupted change changed nothing")
    if afters[1] != after:
        raise SystemExit(f"{tally.name}: two uninterrupted runs of the same change left different states")
    gallery = work / f"{tally.name}-trial"
    for trial in range(trials):
        if deadline_passed():
            break
        clone_gallery(before_dir, gallery)
        delay = float(fractions[trial]) * tally.duration
        tally.trials += 1
        try:
            how = kill_at(cmd_for(gallery), delay, commit_started(gallery, generation) if aim == "commit" else None)
            tally.count(how)
            try:
                now = state(gallery)
            except Exception:  # noqa: BLE001 - the finding to report
                tally.count("does not open")
                tally.problems.append(f"trial {trial} (kill at {delay:.2f} s): does not open:\n{traceback.format_exc()}")
                continue
            seen = "before" if now == before else "after" if now == after else "neither"
            tally.count(f"state {seen}")
            if seen == "neither":
                tally.problems.append(f"trial {trial} (kill at {delay:.2f} s): state is neither before nor after")
            if seen != "after":
                _, rerun = run_cli(cmd_for(gallery))
                if rerun.returncode != 0:
                    tally.problems.append(f"trial {trial}: completing failed ({rerun.returncode}): {rerun.stderr[-2000:]}")
                    continue
            clean_up(gallery)
            final, left = state(gallery), leftovers(gallery)
            if final != after:
                tally.problems.append(f"trial {trial} (kill at {delay:.2f} s, {seen}): completed state differs from after")
            if left:
                tally.problems.append(f"trial {trial} (kill at {delay:.2f} s, {seen}): left behind {left}")
            if seen in ("before", "after") and final == after and not left:
                tally.identical += 1
        except Exception:  # noqa: BLE001
            tally.problems.append(f"trial {trial} (kill at {delay:.2f} s): {traceback.format_exc()}")
        progress(tally)


def soak_run(tally: Tally, cmd_for, clean: Path, work: Path, trials: int, fractions) -> None:  # noqa: ANN001
    want_tables, want_state = tables(clean), state(clean)
    out = work / "run-trial"
    for trial in range(trials):
        if deadline_passed():
            break
        shutil.rmtree(out, ignore_errors=True)
        delay = float(fractions[trial]) * tally.duration
        tally.trials += 1
        try:
            tally.count(kill_at(cmd_for(out), delay))
            _, rerun = run_cli(cmd_for(out))
            if rerun.returncode != 0:
                tally.problems.append(f"trial {trial} (kill at {delay:.2f} s): rerun failed ({rerun.returncode}): "
                                      f"{rerun.stderr[-2000:]}")
                continue
            if "up to date" in rerun.stdout:
                tally.count("rerun: up to date")
            same_tables, same_state, left = tables(out) == want_tables, state(out) == want_state, leftovers(out)
            if not same_tables:
                tally.problems.append(f"trial {trial} (kill at {delay:.2f} s): tables differ from the clean run")
            if not same_state:
                tally.problems.append(f"trial {trial} (kill at {delay:.2f} s): gallery state differs from the clean run")
            if left:
                tally.problems.append(f"trial {trial} (kill at {delay:.2f} s): left behind {left}")
            if same_tables and same_state and not left:
                tally.identical += 1
        except Exception:  # noqa: BLE001
            tally.problems.append(f"trial {trial} (kill at {delay:.2f} s): {traceback.format_exc()}")
        progress(tally)


STARTED = time.monotonic()
MAX_SECONDS = 45 * 60.0


def deadline_passed() -> bool:
    return time.monotonic() - STARTED > MAX_SECONDS


def progress(tally: Tally) -> None:
    print(f"  {tally.name}: trial {tally.trials}, {tally.identical} identical, {tally.outcomes}, "
          f"{time.monotonic() - STARTED:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    global MAX_SECONDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--trials", type=int, default=20, help="Kills per operation.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="--workers of run and sync (add runs in-process).")
    parser.add_argument("--operations", nargs="+", default=["run", "add", "remove", "sync"],
                        choices=["run", "add", "remove", "sync"])
    parser.add_argument("--window", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                        help="Kill moments are drawn from [LO*D, HI*D]; e.g. 0.7 1.0 aims at the commit.")
    parser.add_argument("--aim", choices=["anywhere", "commit"], default="anywhere",
                        help="commit: for add, remove and sync, D is the commit phase (from the first file the "
                             "change writes to its exit) and moments count from that first file.")
    parser.add_argument("--max-minutes", type=float, default=45, help="No trial starts after this.")
    parser.add_argument("--work", default=None, help="Scratch folder [default: a temporary one, deleted after].")
    parser.add_argument("--out", default=None, help="Also write the results as JSON here.")
    args = parser.parse_args()
    MAX_SECONDS = args.max_minutes * 60

    from embedder.runtime import configure_process

    configure_process()
    ctx = tempfile.TemporaryDirectory(prefix="soak-") if args.work is None else None
    work = Path(ctx.name if ctx else args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    tallies: list[Tally] = []
    try:
        dataset = work / "dataset"
        copy_people(dataset, PEOPLE)
        newcomer = work / "newcomer"
        copy_people(newcomer, [NEWCOMER], per_person=5)

        def run_cmd(out: Path) -> list[str]:
            return cli_cmd("run", str(dataset), "--format", "folders", "--out", str(out), "--workers",
                           str(args.workers), "--no-progress", "--partition-size", "10")

        base = work / "base"
        run_seconds = must(run_cmd(base))
        if "run" in args.operations:  # a second clean run: the run is deterministic, and how long it takes
            again = work / "base-again"
            run_seconds = min(run_seconds, must(run_cmd(again)))
            if tables(again) != tables(base) or state(again) != state(base):
                raise SystemExit("two clean runs of the same dataset gave different galleries")
            shutil.rmtree(again)
        print(f"base gallery: {json.loads((base / 'gallery.json').read_text())['counts']}", file=sys.stderr)

        for name in args.operations:
            fractions = rng.uniform(*args.window, args.trials)  # drawn for every operation, in order: same seed, same moments
            tally = Tally(name)
            tallies.append(tally)
            if name == "run":
                tally.duration = run_seconds
                soak_run(tally, run_cmd, base, work, args.trials, fractions)
            elif name == "add":
                before = clone_gallery(base, work / "add-before")
                soak_change(tally, lambda g: cli_cmd("add", str(g), str(newcomer), "--identity", "Tony Blair"),
                            before, work, args.trials, fractions, args.aim)
            elif name == "remove":
                data = work / "dataset-remove"
                shutil.copytree(dataset, data)
                shutil.rmtree(data / ERASED)
                before = clone_gallery(base, work / "remove-before", dataset, data)
                soak_change(tally, lambda g: cli_cmd("remove", str(g), "--identity", ERASED),
                            before, work, args.trials, fractions, args.aim)
            else:
                data = work / "dataset-sync"
                shutil.copytree(dataset, data)
                shutil.rmtree(data / VANISHED)
                copy_people(data, [ARRIVING], per_person=4)
                victim = sorted((data / CHANGED).iterdir())[0]
                victim.unlink()
                shutil.copyfile(LFW_IMAGES / NEWCOMER / f"{NEWCOMER}_0001.jpg", victim)
                before = clone_gallery(base, work / "sync-before", dataset, data)
                soak_change(tally, lambda g: cli_cmd("sync", str(g), "--workers", str(args.workers)),
                            before, work, args.trials, fractions, args.aim)
    finally:
        if ctx is not None:
            ctx.cleanup()

    print()
    total = sum(t.trials for t in tallies)
    same = sum(t.identical for t in tallies)
    for t in tallies:
        what = "identical after resume" if t.name == "run" else "before-or-after, then after once completed"
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(t.outcomes.items()))
        span = f"commit phase {t.duration:.3f}" if args.aim == "commit" and t.name != "run" else f"uninterrupted {t.duration:.1f}"
        print(f"{t.name:7s} {t.identical}/{t.trials} {what} ({span} s; {outcomes})")
    for t in tallies:
        for problem in t.problems:
            print(f"PROBLEM {t.name}: {problem}")
    short = [t.name for t in tallies if t.trials < args.trials]
    print(f"summary: {same}/{total} trials identical over {len(tallies)} operations, seed {args.seed}, "
          f"kills in [{args.window[0]:g}, {args.window[1]:g}] x D, aimed {args.aim}, "
          f"{time.monotonic() - STARTED:.0f} s" + (f"; stopped early by --max-minutes: {', '.join(short)}" if short else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([t.__dict__ for t in tallies], indent=2) + "\n")
    sys.exit(0 if same == total else 1)


if __name__ == "__main__":
    main()
