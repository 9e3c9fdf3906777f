"""``face-index``: build a gallery from a dataset."""

from __future__ import annotations

import json
import logging

import click

from data.images import DEFAULT_MAX_PIXELS
from data.readers import FORMATS, SPLIT_CHOICES
from embedder.pipeline import PipelineConfig
from embedder.runtime import configure_process
from facesearch.cli import tool_group
from facesearch.errors import GalleryError
from indexer.build import INDEX_TYPES, build_gallery
from indexer.config import RunConfig
from indexer.layout import GalleryLayout
from indexer.runner import run_index

log = logging.getLogger("face-index")


@tool_group(configure_process)
def main() -> None:
    """Index face datasets into searchable galleries.

    Example:

        face-index run ~/data/celeba --format celeba --out gallery/
    """


def parse_options(pairs: tuple[str, ...], flag: str) -> dict[str, object]:
    """KEY=VALUE pairs as backend options; numbers and true/false are converted."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=flag)
        text = value.strip()
        parsed: object = text
        if text.lower() in ("true", "false"):
            parsed = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    parsed = kind(text)
                    break
                except ValueError:
                    continue
        options[key.strip().replace("-", "_")] = parsed
    return options


@main.command()
@click.argument("dataset_root", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS)), required=True, help="Dataset layout.")
@click.option("--out", "gallery_dir", type=click.Path(file_okay=False), required=True, help="Gallery directory to write.")
@click.option("--split", type=click.Choice(SPLIT_CHOICES), default="all", show_default=True, help="CelebA split.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Index only the first N images (a quick run).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Worker processes [default: core count; 0: none].")
@click.option("--partition-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Images per partition.")
@click.option("--detector", default="dlib-hog", show_default=True, help="Detector backend.")
@click.option("--landmarks", default="dlib-5", show_default=True, help="Landmark backend.")
@click.option("--embedder", "embedder_name", default="dlib-resnet-onnx-int8", show_default=True,
              help="Embedder backend (dlib-resnet-onnx: dlib's network exactly, 2x slower per face; dlib-resnet-torch: "
                   "the same, in torch, for CUDA; dlib-resnet: dlib's own, slowest).")
@click.option("--flip/--no-flip", default=False, show_default=True, help="Average with the mirrored face's embedding.")
@click.option("--upsample", default=None, help="Detector upsampling: adaptive, always-small, or 0, 1, 2 (finds smaller faces, slower) [default: the detector's].")
@click.option("--max-side", type=click.IntRange(min=64), default=None, help="Detect on a copy at most this many pixels a side.")
@click.option("--max-faces", type=click.IntRange(min=1), default=None, help="Keep at most N faces per image, largest first.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True, help="Refuse larger images.")
@click.option("--index", "index_type", type=click.Choice(INDEX_TYPES), default="auto", show_default=True,
              help="Index kind: auto (exact when small, then hnsw, ivf, ivf-sq4 by size), or one of them.")
@click.option("--target-recall", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Recall@8 against exact search that tuning aims at; higher is slower per query.")
@click.option("--embed-in", type=click.Choice(["auto", "main", "workers"]), default="auto", show_default=True,
              help="Where a torch embedder runs: main (batched, GPU), workers (one thread each, CPU).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the partitions are computed: local worker processes, or a Ray cluster (pip install 'facesearch[ray]').")
@click.option("--ray-address", default=None,
              help="With --engine ray: the cluster to join (auto, HOST:PORT, ray://HOST:PORT), or local to start Ray "
                   "here [default: RAY_ADDRESS, else a cluster started here with ray start, else local].")
@click.option("--ray-embed-gpus", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --engine ray: embed on N actors with one GPU each, while CPU tasks detect (0: all on CPUs).")
@click.option("--ray-runtime-env", default=None, metavar="JSON",
              help="With --engine ray: a Ray runtime_env merged over the default (env_vars PYTHONPATH=this code).")
@click.option("--overwrite", is_flag=True, help="Discard an earlier run with other settings in --out.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--detector-option", "detector_kv", multiple=True, metavar="KEY=VALUE",
              help="A detector backend option, e.g. weights=runs/detector/train/weights/best.pt (repeatable).")
@click.option("--landmarks-option", "landmarks_kv", multiple=True, metavar="KEY=VALUE",
              help="A landmark backend option, e.g. checkpoint=runs/landmarks/landmarks.pt (repeatable).")
@click.option("--embedder-option", "embedder_kv", multiple=True, metavar="KEY=VALUE",
              help="An embedder backend option, e.g. checkpoint=runs/embedder/embedder.pt or model=w600k_r50.onnx (repeatable).")
def run(
    dataset_root: str, fmt: str, gallery_dir: str, split: str, limit: int | None, workers: int | None,
    partition_size: int, detector: str, landmarks: str, embedder_name: str, flip: bool, upsample: str,
    max_side: int | None, max_faces: int | None, max_pixels: int, index_type: str, target_recall: float, embed_in: str,
    engine: str, ray_address: str | None, ray_embed_gpus: int, ray_runtime_env: str | None, overwrite: bool,
    progress: bool, detector_kv: tuple[str, ...], landmarks_kv: tuple[str, ...], embedder_kv: tuple[str, ...],
) -> None:
    """Index every face of a dataset into a gallery directory.

    Rerun the same command after an interruption to finish only what is missing.

    Example:

        face-index run ../shared/data/celeba --format celeba --limit 300 --out /tmp/gallery

    On a Ray cluster (the gallery and dataset on a filesystem every node mounts):

        face-index run /shared/celeba --format celeba --out /shared/gallery --engine ray --ray-address auto
    """
    mapper_engine = _engine(engine, workers, embed_in, ray_address, ray_embed_gpus, ray_runtime_env)
    detector_options: dict[str, object] = {}
    if upsample is not None:
        if not (upsample.isdigit() or upsample in ("adaptive", "always-small")):
            raise click.BadParameter("must be adaptive, always-small or a whole number", param_hint="--upsample")
        detector_options["upsample"] = int(upsample) if upsample.isdigit() else upsample
    if max_side is not None:
        detector_options["max_side"] = max_side
    detector_options.update(parse_options(detector_kv, "--detector-option"))
    pipeline = PipelineConfig(
        detector=detector, landmarks=landmarks, embedder=embedder_name, flip=flip,
        max_faces=max_faces, detector_options=detector_options,
        landmarks_options=parse_options(landmarks_kv, "--landmarks-option"),
        embedder_options=parse_options(embedder_kv, "--embedder-option"),
    )
    config = RunConfig(
        dataset_root=dataset_root, format=fmt, split=split, limit=limit,
        partition_size=partition_size, max_pixels=max_pixels, pipeline=pipeline,
    )
    if mapper_engine is None:
        summary = run_index(config, gallery_dir, workers=workers, overwrite=overwrite, progress=progress,
                            index_type=index_type, embed_in=embed_in, target_recall=target_recall)
    else:
        summary = run_index(config, gallery_dir, overwrite=overwrite, progress=progress, index_type=index_type,
                            target_recall=target_recall, engine=mapper_engine)
    if summary.up_to_date:
        click.echo(f"{summary.gallery_dir} is up to date with its dataset: {summary.images} images, nothing to do")
        return
    log.info(
        "done: %d images, %d faces, %d failures in %s (%d partitions written, %d already done)",
        summary.images, summary.faces_written, summary.failures_written, summary.gallery_dir,
        summary.partitions_written, summary.partitions_done_before,
    )


def _engine(engine: str, workers: int | None, embed_in: str, address: str | None, embed_gpus: int,
            runtime_env: str | None):  # noqa: ANN202 - a RayEngine, or None for the local engine
    """The --engine options checked together; None means the local engine."""
    if engine == "local":
        for flag, given in (("--ray-address", address is not None), ("--ray-embed-gpus", embed_gpus != 0),
                            ("--ray-runtime-env", runtime_env is not None)):
            if given:
                raise click.BadParameter("only with --engine ray", param_hint=flag)
        return None
    if workers is not None:
        raise click.BadParameter("is for the local engine; Ray runs one task per CPU of the cluster", param_hint="--workers")
    if embed_in != "auto":
        raise click.BadParameter("is for the local engine; with --engine ray use --ray-embed-gpus N", param_hint="--embed-in")
    env = None
    if runtime_env is not None:
        try:
            env = json.loads(runtime_env)
        except json.JSONDecodeError as err:
            raise click.BadParameter(f"not JSON: {err}", param_hint="--ray-runtime-env") from None
        if not isinstance(env, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--ray-runtime-env")
    from indexer.ray_engine import RayEngine

    return RayEngine(address=address, embed_gpus=embed_gpus, runtime_env=env)


@main.command()
@click.argument("gallery_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--index", "index_type", type=click.Choice(INDEX_TYPES), default=None,
              help="Index kind: auto (by size) or one of them [default: the gallery's current choice].")
@click.option("--target-recall", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Recall@k against exact search that tuning aims at.")
@click.option("-k", "recall_k", type=click.IntRange(1, 1000), default=8, show_default=True, help="The k of recall@k.")
@click.option("--drop-missing", is_flag=True,
              help="Build from the manifest files that are there when some are missing or corrupt (their faces are "
                   "dropped; face-index sync then re-adds their images from the dataset).")
def build(gallery_dir: str, index_type: str | None, target_recall: float, recall_k: int, drop_missing: bool) -> None:
    """(Re)build the index and gallery.json from the manifest, and tune it.

    Reads only the Parquet files: no face model is loaded. Refuses when manifest
    files are missing, naming them, unless --drop-missing. The tuned setting and
    its measured recall go into gallery.json (see face-index info).

    Example:

        face-index build /tmp/gallery --index hnsw --target-recall 0.98
    """
    from indexer.lock import WriterLock

    with WriterLock(gallery_dir, "face-index build"):
        info = build_gallery(gallery_dir, index_type=index_type, drop_missing=drop_missing, target_recall=target_recall,
                             recall_k=recall_k)
    click.echo(f"{info.index['ntotal']} faces indexed ({describe_index(info.index)}) in {gallery_dir}, "
               f"generation {info.generation}")


@main.command(name="check-recall")
@click.argument("gallery_dir", metavar="GALLERY", type=click.Path(exists=True, file_okay=False))
@click.option("-k", type=click.IntRange(1, 1000), default=None, help="The k of recall@k [default: the tuned k].")
def check_recall(gallery_dir: str, k: int | None) -> None:
    """Measure the index's recall@k against exact search again: the index is rebuilt
    without the build's held-out faces, which are searched with the stored settings
    (as long as a build).

    Example:

        face-index check-recall /tmp/gallery
    """
    from search.recall import check_recall as measure

    result = measure(gallery_dir, k=k)
    groups = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in result["by_group"].items())
    click.echo(f"recall@{result['k']} {result['recall']:.4f} ({groups}) on {result['sample']} held-out faces "
               f"({describe_index(result['index'])}); stored at build: {result['stored_recall']}")


@main.command()
@click.argument("gallery_dir", metavar="GALLERY", type=click.Path(exists=True, file_okay=False))
def verify(gallery_dir: str) -> None:
    """Check every file of the gallery against the checksums in gallery.json.

    Opening a gallery checks the files a search reads (index, metadata,
    vectors); this also reads the manifest and failure parts.

    Example:

        face-index verify /tmp/gallery
    """
    from indexer.layout import verify_file

    layout = GalleryLayout(gallery_dir)
    info = layout.read_info()
    if not info.checksums:
        click.echo(f"{gallery_dir} records no checksums (format {info.format_version}); rebuild it to add them")
        return
    for name in sorted(info.checksums):
        try:
            verify_file(layout, info, layout.root / name)
        except FileNotFoundError:
            raise GalleryError(f"{layout.root / name} is missing: restore it, or run face-index build --drop-missing "
                               f"{layout.root} and then face-index sync {layout.root}") from None
    click.echo(f"{len(info.checksums)} files match their checksums (generation {info.generation})")


def describe_index(index: dict) -> str:
    settings = ", ".join(f"{key} {index[key]}" for key in ("efSearch", "nprobe", "rerank") if key in index)
    tuning = index.get("tuning") or {}
    recall = f", recall@{tuning.get('k')} {tuning.get('recall')}" if tuning.get("recall") is not None else ""
    return f"{index.get('type')}{': ' + settings if settings else ''}{recall}"


@main.command()
@click.argument("gallery_dir", metavar="GALLERY", type=click.Path(exists=True, file_okay=False))
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--identity", help="The person in every added image [default: from the dataset layout, or none].")
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS)), help="SOURCES are datasets of this layout.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Worker processes (0: this process; workers pay off from a few hundred images).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def add(gallery_dir: str, sources: tuple[str, ...], identity: str | None, fmt: str | None, workers: int,
        as_json: bool) -> None:
    """Add images (files, folders, or datasets with --format) to a gallery.

    They are embedded with the gallery's own pipeline. An image whose content is
    already in the gallery is skipped, and said so. Paths under the gallery's
    dataset root are kept in step with it by face-index sync; others stay as added.

    Example:

        face-index add /tmp/gallery new-photos/ --identity "Ada Lovelace"
    """
    from indexer.lifecycle import add_images

    result = add_images(gallery_dir, sources, identity=identity, format=fmt, workers=workers)
    _report(result, as_json)


@main.command()
@click.argument("gallery_dir", metavar="GALLERY", type=click.Path(exists=True, file_okay=False))
@click.option("--face-id", "face_ids", multiple=True, type=int, help="A face id to remove (repeatable).")
@click.option("--identity", "identities", multiple=True, help="Remove every face and record of this identity (repeatable).")
@click.option("--path", "paths", multiple=True, help="Remove every face of this image path, as the gallery stores it (repeatable).")
@click.option("--from-file", type=click.File("r", encoding="utf-8"),
              help="A file of lines 'face-id N', 'identity NAME' or 'path P' ('-' for stdin).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def remove(gallery_dir: str, face_ids: tuple[int, ...], identities: tuple[str, ...], paths: tuple[str, ...],
           from_file, dry_run: bool, as_json: bool) -> None:  # noqa: ANN001
    """Remove faces for good: by face id, identity or image path.

    The manifest parts that held them are rewritten without them, the index no
    longer holds their vectors, failure records of removed images go too, and
    audit.html and eval/ are deleted; the calibration is marked stale. Face ids
    are never reused. changes.log records when and how many, never who.

    Example:

        face-index remove /tmp/gallery --identity 2880 --dry-run
    """
    from indexer.lifecycle import GalleryLayout, remove_faces, still_in_dataset

    face_ids, identities, paths = list(face_ids), list(identities), list(paths)
    if from_file is not None:
        for number, line in enumerate(from_file, 1):
            kind, _, value = line.strip().partition(" ")
            if not kind or kind.startswith("#"):
                continue
            if kind == "face-id" and value.strip().isdigit():
                face_ids.append(int(value))
            elif kind in ("identity", "path") and value.strip():
                (identities if kind == "identity" else paths).append(value.strip())
            else:
                raise click.BadParameter(f"line {number}: expected 'face-id N', 'identity NAME' or 'path P'",
                                         param_hint="--from-file")
    if not (face_ids or identities or paths):
        raise click.UsageError("name what to remove: --face-id, --identity, --path or --from-file")
    plan, result = remove_faces(gallery_dir, face_ids, identities, paths, dry_run=dry_run)
    if dry_run:
        if as_json:
            click.echo(json.dumps({"dry_run": True, "face_ids": list(plan.face_ids), "paths": list(plan.paths),
                                   "failure_paths": list(plan.failure_paths)}, indent=2))
        else:
            click.echo(f"would remove {len(plan.face_ids)} faces of {len(plan.paths)} images"
                       f" and {len(plan.failure_paths)} failure records:")
            for path in plan.paths + plan.failure_paths:
                click.echo(f"  {path}")
        return
    _report(result, as_json)
    layout = GalleryLayout(gallery_dir)
    back = still_in_dataset(layout, layout.read_info(), plan.paths + plan.failure_paths)
    if back:
        log.warning("%d removed image(s) are still in the dataset root and would come back with face-index sync: "
                    "delete them there too", len(back))


@main.command()
@click.argument("gallery_dir", metavar="GALLERY", type=click.Path(exists=True, file_okay=False))
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Worker processes [default: core count; 0: none].")
@click.option("--dry-run", is_flag=True, help="Only say what changed in the dataset.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sync(gallery_dir: str, workers: int | None, dry_run: bool, as_json: bool) -> None:
    """Bring a gallery in line with its dataset: add new images, remove vanished
    ones, re-embed changed ones (by content hash).

    Example:

        face-index sync /tmp/gallery --dry-run
    """
    import os

    from indexer.lifecycle import sync_gallery

    diff, result = sync_gallery(gallery_dir, workers=os.cpu_count() or 1 if workers is None else workers, dry_run=dry_run)
    if not as_json:
        click.echo(f"dataset: {diff.summary()}")
    _report(result, as_json)


def _report(result, as_json: bool) -> None:  # noqa: ANN001 - a ChangeResult
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    for path in result.duplicates:
        click.echo(f"already in the gallery, skipped: {path}")
    if result.dry_run:
        return
    if not result.changed:
        click.echo(f"nothing changed (generation {result.generation})")
        return
    click.echo(f"generation {result.generation}: {result.faces_added} faces added"
               f"{' (ids ' + _id_range(result.added_face_ids) + ')' if result.added_face_ids else ''}, "
               f"{result.faces_removed} removed; {result.images_added} images added, {result.images_removed} removed, "
               f"{result.failures_added} without a face")


def _id_range(ids: tuple[int, ...]) -> str:
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"


@main.command()
@click.argument("gallery_dir", type=click.Path(exists=True, file_okay=False))
def info(gallery_dir: str) -> None:
    """Print a gallery's gallery.json: pipeline, versions, counts, run settings.

    Example:

        face-index info /tmp/gallery
    """
    info = GalleryLayout(gallery_dir).read_info()
    click.echo(json.dumps(info.to_json(), indent=2, sort_keys=True))


if __name__ == "__main__":  # pragma: no cover
    main()
