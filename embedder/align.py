"""Face alignment as pure functions around named templates.

A template is a set of reference points in the output crop's pixel frame.
``embedder.geometry.estimate_similarity`` finds the least-squares similarity
transform from detected points to the template, and ``warp`` applies it to cut
the crop. Templates with dlib's chip geometry are cut by ``embedder.dlib_chip``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from embedder.dlib_chip import chip_details, extract_dlib_chip
from embedder.geometry import estimate_similarity
from embedder.types import Detection


@dataclass(frozen=True)
class AlignTemplate:
    """Where the landmarks of scheme ``scheme`` land in a ``size`` crop.

    scheme: "canonical5" (Detection.landmarks, LANDMARK_NAMES order) or a
        backend's native keypoint scheme such as "dlib5" (Detection.keypoints).
    """

    name: str
    points: tuple[tuple[float, float], ...]
    size: tuple[int, int]  # (width, height)
    scheme: str = "canonical5"
    #: "similarity": the least-squares transform to ``points``; "dlib-chip":
    #: dlib's chip_details geometry (its extraction rectangle), which differs
    #: from the plain fit by up to a pixel and is what dlib's ResNet saw.
    geometry: str = "similarity"

    def array(self) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float64)


#: insightface's ArcFace template for 112x112 crops (arcface_dst in face_align.py).
ARCFACE_112 = AlignTemplate(
    name="arcface-112",
    points=(
        (38.2946, 51.6963),
        (73.5318, 51.5014),
        (56.0252, 71.7366),
        (41.5493, 92.3655),
        (70.7299, 92.2041),
    ),
    size=(112, 112),
)

#: dlib's 5-point face-chip template on the unit square (get_face_chip_details in
#: dlib/image_transforms/interpolation.h), in dlib-5's part order: image-right
#: eye outer and inner corner, image-left eye outer and inner corner, nose base.
DLIB5_UNIT = (
    (0.8595674595992, 0.2134981538014),
    (0.6460604764104, 0.2289674387677),
    (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242),
    (0.4901123135679, 0.6277975316475),
)


def dlib_chip_template(size: int = 150, padding: float = 0.25) -> AlignTemplate:
    """dlib's face chip (``dlib.get_face_chip``): the unit template padded by
    ``padding`` on every side and scaled to ``size`` pixels."""
    points = tuple(
        ((padding + x) / (2 * padding + 1) * size, (padding + y) / (2 * padding + 1) * size) for x, y in DLIB5_UNIT
    )
    return AlignTemplate(
        name=f"dlib-chip-{size}-{padding:g}", points=points, size=(size, size), scheme="dlib5", geometry="dlib-chip"
    )


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Cut the crop of ``size`` (width, height) that ``matrix`` maps the image into.

    When the crop shrinks the face a lot, the image is first downscaled with
    area averaging so that the bilinear warp does not alias.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:
        factor = min(1.0, 2.0 * scale)  # keep the warp's own scale near 0.5..1
        small = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        actual = (small.shape[1] / image.shape[1], small.shape[0] / image.shape[0])
        matrix = matrix @ np.array([[1 / actual[0], 0, 0], [0, 1 / actual[1], 0], [0, 0, 1]])
        image = small
    return cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def points_for(detection: Detection, scheme: str) -> np.ndarray:
    """The detection's landmarks in ``scheme``, or a clear error."""
    if scheme == "canonical5":
        if detection.landmarks is None:
            raise ValueError("detection has no landmarks: run a landmark backend first")
        return detection.landmarks
    if detection.keypoint_scheme != scheme or detection.keypoints is None:
        raise ValueError(
            f"this crop needs {scheme} keypoints but the detection has "
            f"{detection.keypoint_scheme or 'none'}: pair the embedder with a matching landmark backend"
        )
    return detection.keypoints


def dlib_chip_matrix(points: np.ndarray, template: AlignTemplate) -> np.ndarray:
    """Image -> chip matrix with dlib's chip_details geometry (its extraction
    rectangle: side ``size * scale - 1``, centred on the image of the chip's
    centre). :func:`align_face` cuts such chips with dlib's own sampling
    (``embedder.dlib_chip``); this matrix maps points into them."""
    cols, rows = template.size
    (left, top, right, bottom), angle = chip_details(points, template.array(), cols)
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    step = np.diag([(right - left) / (cols - 1), (bottom - top) / (rows - 1)])
    center = np.array([(left + right) / 2, (top + bottom) / 2])
    chip_to_image = np.empty((2, 3))
    chip_to_image[:, :2] = rotation @ step
    chip_to_image[:, 2] = center - rotation @ np.array([(right - left) / 2, (bottom - top) / 2])
    return invert(chip_to_image)


def align_matrix(detection: Detection, template: AlignTemplate) -> np.ndarray:
    """The image -> crop matrix for one detection."""
    points = points_for(detection, template.scheme)
    if template.geometry == "dlib-chip":
        return dlib_chip_matrix(points, template)
    if template.geometry != "similarity":
        raise ValueError(f"unknown alignment geometry {template.geometry!r}")
    return estimate_similarity(points, template.array())


def align_face(image: np.ndarray, detection: Detection, template: AlignTemplate) -> np.ndarray:
    """The aligned crop of one face, (H, W, 3) uint8."""
    if template.geometry == "dlib-chip":
        points = points_for(detection, template.scheme)
        return extract_dlib_chip(image, points, template.array(), template.size[0])
    return warp(image, align_matrix(detection, template), template.size)
