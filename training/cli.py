"""``face-train``: label a dataset, then train a detector, a landmark regressor or an embedder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from embedder.runtime import configure_process
from facesearch.cli import tool_group

log = logging.getLogger("face-train")
FORMATS = ["celeba", "lfw", "folders", "folder"]


def _run_options(outputs: str):  # noqa: ANN202
    """LABELS, --out and --arch of the timm trainers."""

    def decorate(f):  # noqa: ANN001, ANN202
        f = click.option("--arch", default="resnet18", show_default=True, help="timm architecture.")(f)
        f = click.option("--out", required=True, type=click.Path(file_okay=False), help=f"Run directory ({outputs}).")(f)
        return click.argument("labels", type=click.Path(exists=True, file_okay=False))(f)

    return decorate


def _init_options(f):  # noqa: ANN001, ANN202
    f = click.option("--init", "init", type=click.Path(exists=True, dir_okay=False),
                     help="Local weights to start the backbone from (a timm/torch state dict or a face-train checkpoint).")(f)
    f = click.option("--pretrained", is_flag=True,
                     help="Start from timm's ImageNet weights (downloads them: needs the network).")(f)
    f = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 ...")(f)
    return f


def _offline_training() -> None:
    """albumentations checks for updates and ultralytics goes online unless told not to."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")


@tool_group(configure_process, _offline_training)
def main() -> None:
    """Train facesearch's own models on your data (CelebA first).

    Example:

        face-train label ../shared/data/lfw --format lfw --out labels/lfw
        face-train embedder labels/lfw --out runs/embedder --epochs 20
    """


@main.command()
@click.argument("dataset_root", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help="Dataset layout.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Labels directory to write.")
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="all", show_default=True, help="CelebA split.")
@click.option("--limit", type=click.IntRange(1), help="Only the first N images.")
@click.option("--workers", type=click.IntRange(0), help="Worker processes [default: core count].")
def label(dataset_root: str, fmt: str, out: str, split: str, limit: int | None, workers: int | None) -> None:
    """Pseudo-label a dataset with the default pipeline: every face's box, 5
    landmarks and identity, for datasets without such annotations (aligned
    CelebA, LFW, any folder). Resumable, like face-index run.

    Example:

        face-train label ../shared/data/celeba --format celeba --split test --out labels/celeba-test
    """
    from training.samples import label_dataset

    label_dataset(dataset_root, fmt, out, split=None if split == "all" else split, limit=limit, workers=workers)
    click.echo(f"labels in {out}")


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["labels", *FORMATS]), default="labels", show_default=True,
              help="labels: a face-train label directory. celeba: the in-the-wild img_celeba/ with "
                   "Anno/list_bbox_celeba.txt and list_landmarks_celeba.txt when present. Otherwise (aligned "
                   "CelebA, lfw, folders, folder) the images are pseudo-labelled first, into OUT/labels.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (YOLO data in OUT/data, weights in OUT/train).")
@click.option("--model", default="yolov8n-pose.yaml", show_default=True, help="Model yaml (from scratch) or a checkpoint to fine-tune.")
@click.option("--epochs", type=click.IntRange(1), default=50, show_default=True)
@click.option("--imgsz", type=click.IntRange(32), default=640, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=16, show_default=True)
@click.option("--val-fraction", type=click.FloatRange(0.01, 0.5), default=0.1, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--convert-only", is_flag=True, help="Write the YOLO data and stop.")
def detector(source: str, fmt: str, out: str, model: str, epochs: int, imgsz: int, batch: int, val_fraction: float,
             device: str, convert_only: bool) -> None:
    """Train a YOLO face detector that also finds the 5 landmarks (a pose model
    with 5 keypoints), through ultralytics (AGPL-3.0). Use the result with
    --detector yolo --detector-option weights=PATH --landmarks from-detector.

    Example:

        face-train detector labels/lfw --out runs/detector --epochs 30 --imgsz 320
        face-train detector ~/data/celeba --format celeba --out runs/detector-wild
    """
    from training.samples import label_dataset
    from training.yolo import detector_samples, has_celeba_wild, train_yolo, write_yolo_dataset

    if fmt == "celeba" and has_celeba_wild(source):
        samples = detector_samples(source, "celeba-wild")
    elif fmt != "labels":
        log.info("no box and landmark annotations to use: pseudo-labelling %s with the default pipeline", source)
        samples = detector_samples(str(label_dataset(source, fmt, Path(out) / "labels")), "labels")
    else:
        samples = detector_samples(source, "labels")
    dataset = write_yolo_dataset(samples, Path(out) / "data", val_fraction)
    click.echo(f"YOLO data: {dataset.data_yaml} ({dataset.train_images} train, {dataset.val_images} val images, "
               f"{dataset.faces} faces)")
    if convert_only:
        return
    weights = train_yolo(dataset.data_yaml, Path(out) / "train", model=model, epochs=epochs, imgsz=imgsz, batch=batch,
                         device=device)
    click.echo(f"weights: {weights}")


@main.command()
@_run_options("landmarks.pt, history, plot")
@click.option("--size", type=click.IntRange(32), default=112, show_default=True, help="Crop side in pixels.")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--batch", type=click.IntRange(2), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--wing-w", type=float, default=0.04, show_default=True, help="Wing loss w, in fractions of the crop side.")
@click.option("--wing-epsilon", type=float, default=0.008, show_default=True, help="Wing loss epsilon, in fractions of the crop side.")
@_init_options
def landmarks(labels: str, out: str, arch: str, size: int, epochs: int, batch: int, lr: float, wing_w: float,
              wing_epsilon: float, device: str, pretrained: bool, init: str | None) -> None:
    """Train a 5-landmark regressor (timm backbone, Wing loss) on a labels
    directory; reports NME on a held-out 10%. Use the result with
    --landmarks timm-landmarks --landmarks-option checkpoint=PATH.

    Example:

        face-train landmarks labels/lfw --out runs/landmarks --arch resnet18 --epochs 30
    """
    from training.landmarks import train_landmarks

    result = train_landmarks(labels, out, arch=arch, size=size, epochs=epochs, batch_size=batch, lr=lr, wing_w=wing_w,
                             wing_epsilon=wing_epsilon, device=device, pretrained=pretrained, init=init)
    click.echo(f"{result.checkpoint}: validation NME {result.best_nme:.4f} (mean shape {result.mean_shape_nme:.4f})")


@main.command()
@_run_options("embedder.pt, last.pt, history, plot")
@click.option("--dim", type=click.IntRange(8), default=128, show_default=True, help="Embedding size.")
@click.option("--size", type=click.IntRange(32), default=112, show_default=True, help="Aligned crop side (ArcFace template, scaled).")
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True)
@click.option("--ce-epochs", type=click.IntRange(0), default=0, show_default=True, help="Cross-entropy epochs before ArcFace.")
@click.option("--batch", type=click.IntRange(2), default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (warm-up, then cosine).")
@click.option("--arcface-s", type=float, default=32.0, show_default=True, help="ArcFace scale.")
@click.option("--arcface-m", type=float, default=0.5, show_default=True, help="ArcFace angular margin, radians.")
@click.option("--label-smoothing", type=click.FloatRange(0, 0.5), default=0.1, show_default=True)
@click.option("--val-identities", type=click.IntRange(2), default=20, show_default=True,
              help="Identities held out of training, verified every epoch.")
@click.option("--sunglasses", type=click.FloatRange(0, 1), default=0.15, show_default=True, help="Share of crops given sunglasses.")
@click.option("--light-augment", is_flag=True, help="Only flips (no colour, blur, occlusion).")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@_init_options
def embedder(labels: str, out: str, arch: str, dim: int, size: int, epochs: int, ce_epochs: int, batch: int, lr: float,
             arcface_s: float, arcface_m: float, label_smoothing: float, val_identities: int, sunglasses: float,
             light_augment: bool, resume: bool, device: str, pretrained: bool, init: str | None) -> None:
    """Train a face embedder: timm backbone + embedding head, with an ArcFace
    head (and an optional cross-entropy stage first), label smoothing, heavy
    augmentation; every epoch, TPR at FPR 1e-2 on held-out identities. Use the
    result with --embedder timm-arcface --embedder-option checkpoint=PATH.

    Example:

        face-train embedder labels/lfw --out runs/embedder --epochs 20 --ce-epochs 2
    """
    from training.embedder import EmbedderSettings, train_embedder

    settings = EmbedderSettings(arch=arch, dim=dim, size=size, epochs=epochs, ce_epochs=ce_epochs, batch_size=batch, lr=lr,
                                arcface_s=arcface_s, arcface_m=arcface_m, label_smoothing=label_smoothing,
                                val_identities=val_identities, heavy_augment=not light_augment, sunglasses=sunglasses)
    result = train_embedder(labels, out, settings, device=device, pretrained=pretrained, init=init, resume=resume)
    click.echo(f"{result.checkpoint}: held-out TPR at FPR 1e-2 {result.best['tpr']:.4f} (threshold "
               f"{result.best['threshold']:.4f}); at initialisation {result.initial['tpr']:.4f}")


if __name__ == "__main__":  # pragma: no cover
    main()
