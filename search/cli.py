"""``face-search``: query a gallery."""

from __future__ import annotations

import json
import logging

import click

from data.images import ImageLoadError, load_image
from embedder.registry import UnknownBackendError
from indexer.logs import setup_logging
from search.gallery import GalleryError
from search.searcher import Searcher

log = logging.getLogger("face-search")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Search galleries for similar faces.

    Example:

        face-search query me.jpg --gallery gallery/ -k 8
    """
    setup_logging(verbose, quiet)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--gallery", "gallery_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Gallery directory.")
@click.option("-k", type=click.IntRange(1, 1000), default=8, show_default=True, help="Matches per face.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def query(images: tuple[str, ...], gallery_dir: str, k: int, as_json: bool) -> None:
    """Find the k most similar gallery faces for every face in each IMAGE.

    Example:

        face-search query photo.jpg --gallery /tmp/gallery -k 5 --json
    """
    try:
        searcher = Searcher(gallery_dir)
    except (GalleryError, UnknownBackendError) as err:
        raise click.ClickException(str(err)) from err
    report = []
    for path in images:
        entry: dict[str, object] = {"image": path}
        try:
            results = searcher.search(load_image(path), k=k)
            entry["faces"] = [r.to_dict() for r in results]
        except ImageLoadError as err:
            entry["error"] = err.reason
        report.append(entry)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_table(report))
    if all("error" in e for e in report):
        raise click.ClickException("no image could be read")


def format_table(report: list[dict]) -> str:
    lines: list[str] = []
    for entry in report:
        lines.append(f"{entry['image']}")
        if "error" in entry:
            lines.append(f"  error: {entry['error']}")
            continue
        faces = entry["faces"]
        if not faces:
            lines.append("  no face found")
        for face in faces:
            x1, y1, x2, y2 = face["box"]
            lines.append(f"  face {face['face_index']} at ({x1:.0f},{y1:.0f})-({x2:.0f},{y2:.0f}):")
            lines.append(f"    {'rank':>4}  {'cosine':>7}  {'face_id':>7}  {'identity':<20}  path")
            for rank, m in enumerate(face["matches"], 1):
                identity = "-" if m["identity"] is None else str(m["identity"])
                lines.append(f"    {rank:>4}  {m['cosine']:>7.4f}  {m['face_id']:>7}  {identity:<20.20}  {m['path']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
