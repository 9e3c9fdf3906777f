"""``face-train landmarks``: a timm backbone regressing the 5 landmarks of a face crop, with Wing loss."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedder.nets import Checkpoint, Preprocess, landmark_net, save_checkpoint
from training.augment import flip_landmarks, landmark_transform
from training.common import batches, pick_device, plot_curves, seed_everything, warmup_cosine, write_history
from training.losses import wing_loss
from training.samples import landmark_crops, read_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LandmarkResult:
    checkpoint: Path
    history: list[dict[str, Any]]
    best_nme: float
    mean_shape_nme: float  # predicting the training set's mean shape for every face: the floor to beat


def nme(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean point error over faces, each normalised by its inter-ocular distance (eye centres)."""
    iod = np.linalg.norm(target[:, 1] - target[:, 0], axis=1)
    return float((np.linalg.norm(pred - target, axis=2).mean(axis=1) / np.maximum(iod, 1e-6)).mean())


def _augment(crops: np.ndarray, targets: np.ndarray, idx: np.ndarray, transform, rng) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    size = crops.shape[1]
    images, points = [], []
    for i in idx:
        crop, pts = crops[i], targets[i] * size
        if rng.random() < 0.5:
            crop, pts = flip_landmarks(crop, pts)
        result = transform(image=crop, keypoints=pts)
        images.append(result["image"])
        points.append(np.asarray(result["keypoints"], np.float32)[:, :2] / size)
    return np.stack(images), np.stack(points)


def train_landmarks(
    labels: str, out: str, arch: str = "resnet18", size: int = 112, margin: float = 0.2, epochs: int = 30,
    batch_size: int = 64, lr: float = 1e-3, wing_w: float = 0.04, wing_epsilon: float = 0.008, val_fraction: float = 0.1,
    device: str = "auto", pretrained: bool = False, init: str | None = None, seed: int = 0, max_faces: int | None = None,
    max_steps: int | None = None,
) -> LandmarkResult:
    """Train and return the best checkpoint by validation NME (``out/landmarks.pt``).

    wing_w, wing_epsilon: Wing loss parameters in target units (fractions of the crop side).
    max_steps: stop after this many optimiser steps (quick trials, tests).
    """
    import torch

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = seed_everything(seed)
    dev = pick_device(device)
    samples = read_labels(labels, largest_only=False)
    if max_faces is not None:
        samples = samples[:max_faces]
    crops, targets = landmark_crops(samples, size, margin)
    order = rng.permutation(len(crops))
    n_val = max(1, int(round(len(crops) * val_fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    log.info("landmarks: %d train and %d validation faces, %dpx crops, %s on %s", len(train_idx), len(val_idx), size, arch, dev)
    mean_shape = targets[train_idx].mean(axis=0)
    mean_nme = nme(np.broadcast_to(mean_shape, targets[val_idx].shape), targets[val_idx])
    preprocess = Preprocess(crop_size=size, margin=margin)
    model = landmark_net(arch, pretrained=pretrained, init=init).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(train_idx) // batch_size)
    scheduler = warmup_cosine(optimizer, epochs * steps_per_epoch, min(200, steps_per_epoch))
    transform = landmark_transform(size)
    history: list[dict[str, Any]] = []
    best, step = float("inf"), 0
    checkpoint_path = out_dir / "landmarks.pt"
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        losses = []
        for batch in batches(len(train_idx), batch_size, rng, drop_last=True):
            images, points = _augment(crops, targets, train_idx[batch], transform, rng)
            x = preprocess.normalise(images).to(dev)
            loss = wing_loss(model(x), torch.from_numpy(points).to(dev), wing_w, wing_epsilon)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        model.eval()
        with torch.inference_mode():
            pred = np.concatenate([model(preprocess.normalise(crops[val_idx[i:i + 256]]).to(dev)).cpu().numpy()
                                   for i in range(0, len(val_idx), 256)])
        val_nme = nme(pred, targets[val_idx])
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "losses": losses, "val_nme": val_nme,
                        "mean_shape_nme": mean_nme, "seconds": time.perf_counter() - start, "stage": "wing"})
        log.info("epoch %d: wing loss %.5f, validation NME %.4f (mean shape %.4f)", epoch, np.mean(losses), val_nme, mean_nme)
        if val_nme < best:
            best = val_nme
            save_checkpoint(checkpoint_path, Checkpoint(
                kind="landmarks", arch=arch, preprocess=preprocess,
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                info={"epoch": epoch, "val_nme": val_nme, "mean_shape_nme": mean_nme, "wing_w": wing_w,
                      "wing_epsilon": wing_epsilon, "units": "fractions of the crop side", "labels": str(labels)}))
        write_history(out_dir, history)
        plot_curves(out_dir, history, "val_nme", "validation NME")
        if max_steps is not None and step >= max_steps:
            break
    return LandmarkResult(checkpoint_path, history, best, mean_nme)
