"""``face-train embedder``: a timm backbone + embedding head, trained on identity labels with
an optional cross-entropy stage, then ArcFace; verified every epoch on held-out identities."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesearch.errors import ConfigurationError
from embedder.align import ARCFACE_112, AlignTemplate
from embedder.nets import Checkpoint, Preprocess, embedding_net, save_checkpoint
from search.metrics import verification
from training.augment import draw_sunglasses, embedding_transform
from training.common import batches, pick_device, plot_curves, seed_everything, warmup_cosine, write_history
from training.heads import ArcFaceHead, SoftmaxHead
from training.samples import aligned_crops, read_labels, split_identities

log = logging.getLogger(__name__)
STATE_FILE = "last.pt"
CHECKPOINT_FILE = "embedder.pt"  # best held-out TPR at FPR 1e-2
LAST_CHECKPOINT_FILE = "embedder-last.pt"  # the latest epoch


class ResumeError(ConfigurationError):
    """A resume that would not continue the same training."""


@dataclass(frozen=True)
class EmbedderSettings:
    arch: str = "resnet18"
    dim: int = 128
    size: int = 112
    epochs: int = 20
    ce_epochs: int = 0  # cross-entropy (softmax) epochs before ArcFace
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    arcface_s: float = 32.0
    arcface_m: float = 0.5
    label_smoothing: float = 0.1
    val_identities: int = 20
    heavy_augment: bool = True
    sunglasses: float = 0.15  # probability per training crop
    seed: int = 0
    max_faces: int | None = None
    max_steps_per_epoch: int | None = None


@dataclass(frozen=True)
class EmbedderResult:
    checkpoint: Path
    history: list[dict[str, Any]]
    initial: dict[str, float]  # held-out verification before training
    best: dict[str, float]


def template_for(size: int) -> AlignTemplate:
    """insightface's ArcFace template scaled to a ``size`` crop."""
    scale = size / 112.0
    return AlignTemplate(name=f"arcface-{size}", points=tuple((x * scale, y * scale) for x, y in ARCFACE_112.points),
                         size=(size, size))


def separation(embeddings: np.ndarray, labels: np.ndarray, fpr: float = 1e-2) -> dict[str, float]:
    """How well embeddings tell identities apart: ROC AUC, TPR at ``fpr`` with its
    threshold, and the gap between the mean same-person and different-person cosine."""
    x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    v = verification(x, labels, fprs=(fpr,), bins=200)
    scores = x @ x.T
    i, j = np.triu_indices(len(x), k=1)
    same = labels[i] == labels[j]
    gap = float(scores[i, j][same].mean() - scores[i, j][~same].mean())
    return {"auc": v.auc, "tpr": v.points[0].tpr, "threshold": v.points[0].threshold, "gap": gap}


def embed_crops(model, crops: np.ndarray, preprocess: Preprocess, device: str, batch: int = 256) -> np.ndarray:  # noqa: ANN001
    import torch

    model.eval()
    with torch.inference_mode():
        return np.concatenate([
            torch.nn.functional.normalize(model(preprocess.normalise(crops[i:i + batch]).to(device)), dim=1).cpu().numpy()
            for i in range(0, len(crops), batch)])


def _augment(crops: np.ndarray, idx: np.ndarray, transform, template: AlignTemplate, p_glasses: float, rng) -> np.ndarray:  # noqa: ANN001
    left_eye, right_eye = template.points[0], template.points[1]
    out = []
    for i in idx:
        crop = crops[i]
        if p_glasses and rng.random() < p_glasses:
            crop = draw_sunglasses(crop, left_eye, right_eye, rng)
        out.append(transform(image=crop)["image"])
    return np.stack(out)


def train_embedder(labels: str, out: str, settings: EmbedderSettings = EmbedderSettings(), device: str = "auto",
                   pretrained: bool = False, init: str | None = None, resume: bool = False) -> EmbedderResult:
    """Train. ``out/embedder.pt`` is the best checkpoint by held-out TPR at FPR 1e-2,
    ``out/embedder-last.pt`` the latest epoch's, ``out/last.pt`` the full state to resume from."""
    import torch
    import torch.nn.functional as F

    s = settings
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = seed_everything(s.seed)
    dev = pick_device(device)
    samples = read_labels(labels, largest_only=True)
    if s.max_faces is not None:
        samples = samples[: s.max_faces]
    train, val = split_identities(samples, s.val_identities, s.seed)
    counts: dict[str, int] = {}
    for sample in train:
        counts[sample.identity] = counts.get(sample.identity, 0) + 1
    train = [x for x in train if counts[x.identity] >= 2]
    classes = sorted({x.identity for x in train})
    template = template_for(s.size)
    preprocess = Preprocess(crop_size=s.size, template=template.points, template_name=template.name)
    train_crops, train = aligned_crops(train, template)
    val_crops, val = aligned_crops(val, template)
    y = torch.tensor([classes.index(x.identity) for x in train])
    val_labels = np.array([x.identity for x in val])
    log.info("embedder: %d faces of %d identities to train, %d faces of %d held-out identities to verify; %s on %s",
             len(train), len(classes), len(val), len(set(val_labels)), s.arch, dev)

    model = embedding_net(s.arch, s.dim, pretrained=pretrained, init=init).to(dev)
    ce_head, arc_head = SoftmaxHead(s.dim, len(classes)).to(dev), ArcFaceHead(s.dim, len(classes), s.arcface_s, s.arcface_m).to(dev)
    params = list(model.parameters()) + list(ce_head.parameters()) + list(arc_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = max(1, len(train) // s.batch_size)
    if s.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, s.max_steps_per_epoch)
    scheduler = warmup_cosine(optimizer, s.epochs * steps_per_epoch, min(500, steps_per_epoch))
    transform = embedding_transform(s.size, s.heavy_augment)
    history: list[dict[str, Any]] = []
    start_epoch = 1
    state_path = out_dir / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location=dev, weights_only=False)
        saved = {k: v for k, v in state["settings"].items() if k != "epochs"}  # more epochs: extending the run is fine
        if saved != {k: v for k, v in asdict(s).items() if k != "epochs"} or state["classes"] != classes:
            raise ResumeError(f"{state_path} was made with other settings or labels; start afresh without --resume")
        model.load_state_dict(state["model"])
        ce_head.load_state_dict(state["ce_head"])
        arc_head.load_state_dict(state["arc_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        start_epoch = state["epoch"] + 1
        log.info("resuming after epoch %d", state["epoch"])
    initial = history[0]["initial"] if history else separation(embed_crops(model, val_crops, preprocess, dev), val_labels)
    best = max((h["val"] for h in history), key=lambda v: v["tpr"], default={"tpr": -1.0})
    for epoch in range(start_epoch, s.epochs + 1):
        stage = "cross-entropy" if epoch <= s.ce_epochs else "arcface"
        head = ce_head if stage == "cross-entropy" else arc_head
        started = time.perf_counter()
        model.train()
        losses = []
        for step, batch in enumerate(batches(len(train), s.batch_size, rng, drop_last=True)):
            if step >= steps_per_epoch:
                break
            x = preprocess.normalise(_augment(train_crops, batch, transform, template, s.sunglasses, rng)).to(dev)
            target = y[batch].to(dev)
            logits = head(model(x), target)
            loss = F.cross_entropy(logits, target, label_smoothing=s.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        metrics = separation(embed_crops(model, val_crops, preprocess, dev), val_labels)
        entry = {"epoch": epoch, "stage": stage, "train_loss": float(np.mean(losses)), "val": metrics,
                 "tpr_at_1e-2": metrics["tpr"], "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started}
        if epoch == 1 or not history:
            entry["initial"] = initial
        history.append(entry)
        log.info("epoch %d (%s): loss %.4f, held-out TPR %.4f at FPR 1e-2 (threshold %.4f), AUC %.4f", epoch, stage,
                 entry["train_loss"], metrics["tpr"], metrics["threshold"], metrics["auc"])
        checkpoint = Checkpoint(
            kind="embedder", arch=s.arch, preprocess=preprocess, embedding_dim=s.dim,
            state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
            info={"epoch": epoch, "tpr_at_1e-2": metrics["tpr"], "threshold": metrics["threshold"],
                  "auc": metrics["auc"], "settings": asdict(s), "labels": str(labels), "classes": len(classes)})
        save_checkpoint(out_dir / LAST_CHECKPOINT_FILE, checkpoint)
        if metrics["tpr"] > best["tpr"]:
            best = metrics
            save_checkpoint(out_dir / CHECKPOINT_FILE, checkpoint)
        torch.save({"model": model.state_dict(), "ce_head": ce_head.state_dict(), "arc_head": arc_head.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                    "history": history, "rng": rng.bit_generator.state, "settings": asdict(s), "classes": classes},
                   out_dir / f".{STATE_FILE}.tmp")
        (out_dir / f".{STATE_FILE}.tmp").replace(state_path)
        write_history(out_dir, history)
        plot_curves(out_dir, history, "tpr_at_1e-2", "held-out TPR at FPR 1e-2")
    (out_dir / "summary.json").write_text(json.dumps({"initial": initial, "best": best, "epochs": len(history)}, indent=2))
    return EmbedderResult(out_dir / CHECKPOINT_FILE, history, initial, best)
