"""Training heads that live beside the embedding model, never inside it."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ArcFaceHead(nn.Module):
    """Additive angular margin (Deng et al., CVPR 2019): logits s * cos(theta + m) for
    the true class and s * cos(theta) for the others, from L2-normalised embeddings
    and class centres.

    s: the scale (radius of the hypersphere); m: the margin in radians.
    """

    def __init__(self, dim: int, classes: int, s: float = 32.0, m: float = 0.5) -> None:
        super().__init__()
        if classes < 2:
            raise ValueError(f"ArcFace needs at least 2 classes, got {classes}")
        self.s, self.m = float(s), float(m)
        self.weight = nn.Parameter(torch.empty(classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)  # beyond it theta + m would pass pi: fall back to a linear penalty
        self.mm = math.sin(math.pi - m) * m

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        if labels is None:
            return self.s * cosine
        sine = torch.sqrt(1.0 - cosine * cosine)
        phi = cosine * self.cos_m - sine * self.sin_m
        phi = torch.where(cosine > self.th, phi, cosine - self.mm)
        one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        return self.s * (one_hot * phi + (1 - one_hot) * cosine)


class SoftmaxHead(nn.Module):
    """A plain linear classifier over the embedding: the cross-entropy pre-training stage."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(embeddings)
