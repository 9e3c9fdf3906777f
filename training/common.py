"""What the trainers share: device, seeding, LR schedule, batches, learning curves."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but no CUDA GPU is available")
    return device


def seed_everything(seed: int) -> np.random.Generator:
    import torch

    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int):  # noqa: ANN001, ANN201
    """Linear warm-up, then cosine decay to 1% of the base LR (per optimiser step)."""
    import torch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batches(n: int, batch_size: int, rng: np.random.Generator, shuffle: bool = True, drop_last: bool = False):  # noqa: ANN201
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    tmp = out / f".history.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(history, indent=2), encoding="utf-8")
    os.replace(tmp, out / "history.json")


def plot_curves(out: Path, history: list[dict[str, Any]], metric: str, metric_label: str) -> Path:
    """Train loss and a validation metric per epoch, as learning_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    stages = sorted({h.get("stage", "") for h in history} - {""})
    if len(stages) > 1:
        for h0, h1 in zip(history, history[1:]):
            if h0.get("stage") != h1.get("stage"):
                ax.axvline((h0["epoch"] + h1["epoch"]) / 2, color="grey", ls=":", lw=1)
    values = [h.get(metric) for h in history]
    if any(v is not None for v in values):
        twin = ax.twinx()
        twin.plot(epochs, values, "s-", color="tab:green", label=metric_label)
        twin.set_ylabel(metric_label, color="tab:green")
    ax.set_title(f"learning curve ({', '.join(stages) or 'train'})", fontsize=10)
    fig.tight_layout()
    path = out / "learning_curve.png"
    fig.savefig(path)
    plt.close(fig)
    return path
