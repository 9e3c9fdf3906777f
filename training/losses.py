"""Wing loss (Feng et al., CVPR 2018) for landmark regression."""

from __future__ import annotations

import math


def wing_loss(pred, target, w: float = 0.04, epsilon: float = 0.008):  # noqa: ANN001, ANN201
    """Mean Wing loss over all coordinates.

    wing(x) = w * ln(1 + |x| / epsilon)   if |x| < w
              |x| - C                     otherwise, C = w - w * ln(1 + w / epsilon)

    ``w`` and ``epsilon`` are in the units of the targets. facesearch's targets
    are landmark coordinates as fractions of the face crop's side, so the
    defaults (0.04, 0.008) are the paper's 10 px and 2 px on a 256 px crop.
    C makes the two pieces meet at |x| = w, so the loss is continuous there.
    """
    import torch

    if w <= 0 or epsilon <= 0:
        raise ValueError(f"w and epsilon must be positive, got {w} and {epsilon}")
    x = (pred - target).abs()
    c = w - w * math.log(1 + w / epsilon)
    return torch.where(x < w, w * torch.log1p(x / epsilon), x - c).mean()
