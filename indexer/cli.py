"""``face-index``: build a gallery from a dataset."""

from __future__ import annotations

import json
import logging

import click

from data.images import DEFAULT_MAX_PIXELS
from data.readers import FORMATS, SPLIT_CHOICES, DatasetError
from embedder.backends.base import BackendUnavailableError
from embedder.pipeline import PipelineConfig
from embedder.registry import UnknownBackendError
from embedder.runtime import configure_process
from indexer.build import GALLERY_FILE, INDEX_TYPES, GalleryBuildError, build_gallery
from indexer.config import ConfigMismatchError, RunConfig
from indexer.logs import setup_logging
from indexer.runner import IndexRunError, run_index

log = logging.getLogger("face-index")
DOMAIN_ERRORS = (DatasetError, ConfigMismatchError, GalleryBuildError, IndexRunError, UnknownBackendError, BackendUnavailableError,
                 ValueError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Index face datasets into searchable galleries.

    Example:

        face-index run ~/data/celeba --format celeba --out gallery/
    """
    setup_logging(verbose, quiet)
    configure_process()


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
@click.option("--embedder", "embedder_name", default="dlib-resnet-torch", show_default=True, help="Embedder backend (dlib-resnet: dlib's own, slower).")
@click.option("--flip/--no-flip", default=False, show_default=True, help="Average with the mirrored face's embedding.")
@click.option("--upsample", default=None, help="Detector upsampling: adaptive, always-small, or 0, 1, 2 (finds smaller faces, slower) [default: the detector's].")
@click.option("--max-side", type=click.IntRange(min=64), default=None, help="Detect on a copy at most this many pixels a side.")
@click.option("--max-faces", type=click.IntRange(min=1), default=None, help="Keep at most N faces per image, largest first.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True, help="Refuse larger images.")
@click.option("--index", "index_type", type=click.Choice(INDEX_TYPES), default="flat", show_default=True, help="FAISS index type.")
@click.option("--embed-in", type=click.Choice(["auto", "main", "workers"]), default="auto", show_default=True,
              help="Where a torch embedder runs: main (batched, GPU), workers (one thread each, CPU).")
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
    max_side: int | None, max_faces: int | None, max_pixels: int, index_type: str, embed_in: str, overwrite: bool,
    progress: bool, detector_kv: tuple[str, ...], landmarks_kv: tuple[str, ...], embedder_kv: tuple[str, ...],
) -> None:
    """Index every face of a dataset into a gallery directory.

    Rerun the same command after an interruption to finish only what is missing.

    Example:

        face-index run ../shared/data/celeba --format celeba --limit 300 --out /tmp/gallery
    """
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
    try:
        config = RunConfig(
            dataset_root=dataset_root, format=fmt, split=split, limit=limit,
            partition_size=partition_size, max_pixels=max_pixels, pipeline=pipeline,
        )
        summary = run_index(config, gallery_dir, workers=workers, overwrite=overwrite, progress=progress, index_type=index_type,
                            embed_in=embed_in)
    except DOMAIN_ERRORS as err:
        raise click.ClickException(str(err)) from err
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; rerun the same command to resume") from None
    log.info(
        "done: %d images, %d faces, %d failures in %s (%d partitions written, %d already done)",
        summary.images, summary.faces_written, summary.failures_written, summary.gallery_dir,
        summary.partitions_written, summary.partitions_done_before,
    )


@main.command()
@click.argument("gallery_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--index", "index_type", type=click.Choice(INDEX_TYPES), default="flat", show_default=True, help="FAISS index type.")
def build(gallery_dir: str, index_type: str) -> None:
    """(Re)build the FAISS index and gallery.json from the manifest.

    Example:

        face-index build /tmp/gallery --index hnsw
    """
    try:
        info = build_gallery(gallery_dir, index_type=index_type)
    except DOMAIN_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{info['index']['ntotal']} faces indexed ({index_type}) in {gallery_dir}")


@main.command()
@click.argument("gallery_dir", type=click.Path(exists=True, file_okay=False))
def info(gallery_dir: str) -> None:
    """Print a gallery's gallery.json: pipeline, versions, counts, run settings.

    Example:

        face-index info /tmp/gallery
    """
    from pathlib import Path

    path = Path(gallery_dir) / GALLERY_FILE
    if not path.is_file():
        raise click.ClickException(f"{gallery_dir} is not a built gallery: {GALLERY_FILE} is missing")
    try:
        click.echo(json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=2, sort_keys=True))
    except (OSError, json.JSONDecodeError) as err:
        raise click.ClickException(f"{path} is unreadable: {err}") from err


if __name__ == "__main__":  # pragma: no cover
    main()
