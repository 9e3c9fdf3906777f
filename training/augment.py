"""Augmentations (albumentations) for the landmark and embedding trainers, and a
synthetic sunglasses overlay drawn from the eye landmarks."""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network

#: canonical landmark order after a horizontal flip: the eyes and the mouth corners swap
FLIP_ORDER = (1, 0, 2, 4, 3)


def draw_sunglasses(image: np.ndarray, left_eye: Sequence[float], right_eye: Sequence[float],
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """A copy of ``image`` with dark lenses over the two eyes and a bridge between them.

    The lens size follows the inter-ocular distance; shade and opacity vary with ``rng``.
    """
    rng = rng or np.random.default_rng()
    out = image.copy()
    left, right = np.asarray(left_eye, np.float64), np.asarray(right_eye, np.float64)
    distance = float(np.linalg.norm(right - left))
    if distance < 2:
        return out
    angle = float(np.degrees(np.arctan2(right[1] - left[1], right[0] - left[0])))
    axes = (max(1, int(round(distance * rng.uniform(0.36, 0.44)))), max(1, int(round(distance * rng.uniform(0.26, 0.33)))))
    shade = tuple(int(v) for v in rng.integers(0, 40, size=3))
    layer = out.copy()
    for centre in (left, right):
        cv2.ellipse(layer, (int(round(centre[0])), int(round(centre[1]))), axes, angle, 0, 360, shade, -1, cv2.LINE_AA)
    thickness = max(1, int(round(distance * 0.06)))
    inner_l = left + (right - left) / distance * axes[0]
    inner_r = right - (right - left) / distance * axes[0]
    cv2.line(layer, tuple(int(round(v)) for v in inner_l), tuple(int(round(v)) for v in inner_r), shade, thickness, cv2.LINE_AA)
    alpha = float(rng.uniform(0.85, 0.97))
    return cv2.addWeighted(layer, alpha, out, 1 - alpha, 0)


def landmark_transform(size: int):  # noqa: ANN201
    """Keypoint-aware geometric and photometric augmentation of a landmark crop."""
    import albumentations as A

    return A.Compose(
        [
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-18, 18), border_mode=cv2.BORDER_CONSTANT,
                     fill=128, p=0.8),
            A.RandomBrightnessContrast(0.25, 0.25, p=0.6),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5)), A.GaussNoise()], p=0.3),
            A.ToGray(p=0.1),
        ],
        keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
    )


def embedding_transform(size: int, heavy: bool = True):  # noqa: ANN201
    """Augmentation of an aligned face crop for embedding training."""
    import albumentations as A

    if not heavy:
        return A.Compose([A.HorizontalFlip(p=0.5)])
    hole = max(4, size // 5)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(scale=(0.93, 1.07), translate_percent=(-0.04, 0.04), rotate=(-8, 8), border_mode=cv2.BORDER_CONSTANT,
                     fill=0, p=0.5),
            A.RandomBrightnessContrast(0.3, 0.3, p=0.6),
            A.HueSaturationValue(10, 20, 15, p=0.4),
            A.ToGray(p=0.15),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5)), A.Downscale(scale_range=(0.4, 0.8)),
                     A.ImageCompression(quality_range=(30, 80))], p=0.4),
            A.GaussNoise(p=0.2),
            A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(hole // 2, hole), hole_width_range=(hole // 2, hole),
                            p=0.25),
        ]
    )


def flip_landmarks(crop: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror a crop and its (5, 2) pixel landmarks, swapping left and right points."""
    width = crop.shape[1]
    mirrored = points.copy()
    mirrored[:, 0] = width - 1 - mirrored[:, 0]
    return np.ascontiguousarray(crop[:, ::-1]), mirrored[list(FLIP_ORDER)]
