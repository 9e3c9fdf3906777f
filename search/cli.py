"""``face-search``: query a gallery."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from data.images import ImageLoadError, load_image
from embedder.runtime import configure_process
from facesearch.cli import tool_group
from search.gallery import Gallery
from search.searcher import Searcher, configure_faiss

log = logging.getLogger("face-search")


@tool_group(configure_faiss, configure_process)
def main() -> None:
    """Search galleries for similar faces.

    Example:

        face-search query me.jpg --gallery gallery/ -k 8
    """


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
    searcher = Searcher(gallery_dir)
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


@main.command(name="eval")
@click.argument("gallery_dir", metavar="GALLERY", type=click.Path(exists=True, file_okay=False))
@click.option("--fpr", "fprs", multiple=True, type=float, default=(1e-2, 1e-3, 1e-4), show_default=True,
              help="False-positive rates to report TPR and threshold at (repeatable).")
@click.option("-k", type=click.IntRange(1, 1000), default=8, show_default=True, help="k of mAP@k.")
@click.option("--calibrate-fpr", type=float, default=1e-3, show_default=True,
              help="FPR of the 'same person' threshold; lower is stricter (fewer false matches, more missed).")
@click.option("--save/--no-save", default=True, show_default=True, help="Store the calibration in gallery.json.")
@click.option("--lfw-pairs", type=click.Path(exists=True, dir_okay=False), help="LFW pairs.txt: add View 2 10-fold accuracy.")
@click.option("--figures", "figures_dir", type=click.Path(file_okay=False),
              help="Where to write the PNG figures [default: GALLERY/eval].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_command(gallery_dir: str, fprs: tuple[float, ...], k: int, calibrate_fpr: float, save: bool,
                 lfw_pairs: str | None, figures_dir: str | None, as_json: bool) -> None:
    """Verification, identification and calibration of an identity-labelled gallery.

    Verification is exact over all pairs of faces (one face per image): TPR
    and threshold at each --fpr, ROC AUC, and PNG figures of the same-person
    and different-person cosine histograms and the ROC curve. Identification
    is leave-one-out rank-1 and mAP@k. The calibrated thresholds are stored in
    gallery.json (unless --no-save); search results then say whether each
    match is the same person, uncertain, or a different person.

    Example:

        face-search eval gallery/ --lfw-pairs lfw/pairs.txt --json
    """
    from search.calibration import save_calibration
    from indexer.layout import GalleryLayout
    from search.evaluate import evaluate, format_eval

    figures = Path(figures_dir) if figures_dir else GalleryLayout(gallery_dir).eval_dir
    result = evaluate(gallery_dir, fprs=tuple(fprs), k=k, calibration_fpr=calibrate_fpr,
                      lfw_pairs=lfw_pairs, figures_dir=figures)
    (figures / "eval.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    if save:
        save_calibration(gallery_dir, result.calibration)
        log.info("calibration stored in %s", GalleryLayout(gallery_dir).info_file)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_eval(result))


@main.command()
@click.argument("queries", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--gallery", "gallery_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Gallery directory.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("-k", type=click.IntRange(1, 100), default=8, show_default=True, help="Matches shown per face.")
def report(queries: tuple[str, ...], gallery_dir: str, out: str, k: int) -> None:
    """One self-contained HTML page: every face of each QUERY (an image, or a
    directory of images) with its k nearest gallery faces as thumbnails, with
    cosine and identity, coloured by the gallery's calibration.

    Example:

        face-search report me.jpg holiday/ --gallery gallery/ --out report.html
    """
    from search.report import build_report

    summary = build_report(gallery_dir, queries, out, k=k)
    verdicts = ", ".join(f"{v} {n}" for v, n in sorted(summary.top_verdicts.items())) or "none"
    click.echo(f"{summary.path}: {summary.queries} images, {summary.faces} faces ({summary.no_face} without a face, "
               f"{summary.errors} unreadable); best matches: {verdicts}")


@main.command()
@click.argument("gallery_dir", metavar="GALLERY", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="HTML file to write [default: GALLERY/audit.html].")
@click.option("--duplicate-threshold", type=click.FloatRange(-1, 1), default=0.985, show_default=True,
              help="Cosine from which two images are near-duplicates; lower also finds re-shot photos.")
@click.option("--limit", type=click.IntRange(1), default=200, show_default=True, help="Items shown per list in the HTML.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def audit(gallery_dir: str, out: str | None, duplicate_threshold: float, limit: int, as_json: bool) -> None:
    """Find likely label noise, look-alike identities and near-duplicate
    images in an identity-labelled gallery; writes an HTML page of them.

    Example:

        face-search audit gallery/ --out audit.html
    """
    from search.audit import audit_gallery, format_audit, write_audit_html

    gallery = Gallery.load(gallery_dir)
    result = audit_gallery(gallery, duplicate_threshold=duplicate_threshold)
    path = write_audit_html(result, gallery, out or gallery.layout.audit_file, limit=limit)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_audit(result) + f"\nHTML: {path}")


@main.command()
@click.option("--gallery", "gallery_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Gallery directory.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all interfaces).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--max-upload-mb", type=click.FloatRange(0.01), default=10.0, show_default=True, help="Largest upload accepted.")
@click.option("--max-json-mb", type=click.FloatRange(0.01), default=16.0, show_default=True,
              help="Largest JSON body accepted (/v1/search/vector; 1000 512-D vectors take about 12 MB).")
@click.option("--max-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Largest image accepted, in pixels (checked before decoding).")
@click.option("--max-k", type=click.IntRange(1, 1000), default=100, show_default=True, help="Largest k a request may ask for.")
@click.option("--concurrency", type=click.IntRange(1), default=None, help="Searches at once [default: core count].")
@click.option("--read-only", is_flag=True, help="No enrolment or deletion routes, even with a token.")
def serve(gallery_dir: str, host: str, port: int, max_upload_mb: float, max_json_mb: float, max_pixels: int,
          max_k: int, concurrency: int | None, read_only: bool) -> None:
    """Serve the gallery over HTTP (FastAPI + uvicorn); OpenAPI docs at /docs.

    Set FACESEARCH_API_TOKEN to require "Authorization: Bearer <token>" on /v1.
    With a token, POST /v1/faces enrolls and DELETE /v1/faces/ID and
    /v1/identities/NAME remove (unless --read-only); without one there are no
    write routes. Changes made by any process show up without a restart.

    Example:

        face-search serve --gallery gallery/ --port 8000
        curl -F image=@me.jpg -F k=5 http://127.0.0.1:8000/v1/search
    """
    try:
        from search.service import ServiceSettings, serve as run_service
    except ImportError as err:
        raise click.ClickException(f"the service needs FastAPI and uvicorn: pip install 'facesearch[serve]' ({err})") from err
    settings = ServiceSettings(gallery=gallery_dir, max_upload_bytes=int(max_upload_mb * 2**20),
                               max_json_bytes=int(max_json_mb * 2**20), max_pixels=max_pixels,
                               max_k=max_k, concurrency=concurrency, read_only=read_only)
    Gallery.load(gallery_dir)  # fail here, with a clean message, rather than inside uvicorn's start-up
    run_service(settings, host=host, port=port)


@main.command()
@click.option("--gallery", "gallery_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Gallery directory.")
@click.option("--allow", "allowed", multiple=True, type=int,
              help="Telegram user id allowed to use the bot (repeatable); required unless --public.")
@click.option("--public", is_flag=True, help="Answer every Telegram user (no allowlist); the bot refuses to start without --allow or this.")
@click.option("--rate", type=click.IntRange(1), default=6, show_default=True, help="Photos per user per minute.")
@click.option("--max-file-mb", type=click.FloatRange(0.01), default=10.0, show_default=True, help="Largest photo or file accepted.")
@click.option("--max-faces", type=click.IntRange(1, 10), default=5, show_default=True, help="Faces answered per photo, largest first.")
@click.option("--max-in-flight", type=click.IntRange(1), default=8, show_default=True,
              help="Photos handled at once, all users together; more get a 'busy, try again' answer.")
@click.option("--max-mb-in-flight", type=click.FloatRange(0.01), default=64.0, show_default=True,
              help="Their declared sizes together (an unknown size counts as --max-file-mb); at least --max-file-mb.")
@click.option("--api-server", help="Bot API server URL [default: Telegram's].")
def bot(gallery_dir: str, allowed: tuple[int, ...], public: bool, rate: int, max_file_mb: float, max_faces: int,
        max_in_flight: int, max_mb_in_flight: float, api_server: str | None) -> None:
    """Run a Telegram bot that answers each face of a photo with its 8 most
    similar gallery faces. The token is read from TELEGRAM_BOT_TOKEN. The bot
    answers only the users given with --allow, or everyone with --public.

    Example:

        TELEGRAM_BOT_TOKEN=123:abc face-search bot --gallery gallery/ --allow 12345
    """
    import asyncio
    import os

    try:
        from search.bot import TOKEN_ENV, BotSettings, run_bot
        import aiogram  # noqa: F401
    except ImportError as err:
        raise click.ClickException(f"the bot needs aiogram 3: pip install 'facesearch[bot]' ({err})") from err
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise click.ClickException(f"set {TOKEN_ENV} to the bot's token (from @BotFather); it is never taken as a flag")
    settings = BotSettings(gallery=gallery_dir, allowed_users=frozenset(allowed) if allowed else None, public=public,
                           rate_limit=rate, max_file_bytes=int(max_file_mb * 2**20), max_faces=max_faces,
                           max_in_flight=max_in_flight, max_bytes_in_flight=int(max_mb_in_flight * 2**20),
                           api_server=api_server)
    settings.validate()  # before loading anything: ConfigurationError -> one line, exit 1
    Gallery.load(gallery_dir)
    try:
        asyncio.run(run_bot(settings, token))
    except KeyboardInterrupt:
        log.info("bot stopped")


@main.command()
@click.argument("source")
@click.option("--gallery", "gallery_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Gallery directory.")
@click.option("--out", type=click.Path(dir_okay=False), help="Video file to write [default without a display: watch-SOURCE.mp4].")
@click.option("--every", type=click.IntRange(1), default=1, show_default=True,
              help="Search every n-th frame; higher is faster, labels lag behind moving faces.")
@click.option("--max-frames", type=click.IntRange(1), help="Stop after this many frames.")
@click.option("--window/--no-window", default=None, help="Show a window [default: when there is a display].")
def watch(source: str, gallery_dir: str, out: str | None, every: int, max_frames: int | None, window: bool | None) -> None:
    """Label the faces of live video with their nearest gallery identity and
    cosine. SOURCE is a camera index (0) or a video file.

    Example:

        face-search watch clip.mp4 --gallery gallery/ --out clip-labelled.mp4
    """
    from search.watch import watch as run_watch

    summary = run_watch(Searcher(gallery_dir), source, out=out, every=every, max_frames=max_frames, show=window)
    top = ", ".join(f"{k} ({n})" for k, n in sorted(summary.identities.items(), key=lambda kv: -kv[1])[:5]) or "none"
    where = f" -> {summary.output}" if summary.output else ""
    click.echo(f"{summary.frames} frames, {summary.faces} faces in {summary.seconds:.1f} s "
               f"({summary.frames / max(summary.seconds, 1e-9):.1f} frames/s){where}; nearest identities: {top}")


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
            lines.append(f"    {'rank':>4}  {'cosine':>7}  {'verdict':<9}  {'face_id':>7}  {'identity':<20}  path")
            for rank, m in enumerate(face["matches"], 1):
                identity = "-" if m["identity"] is None else str(m["identity"])
                verdict = m.get("verdict") or "-"
                lines.append(
                    f"    {rank:>4}  {m['cosine']:>7.4f}  {verdict:<9}  {m['face_id']:>7}  {identity:<20.20}  {m['path']}"
                )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
