"""Face masks: the convex hull of a face's outline, grown by a margin, with a Gaussian edge.

The outline lives in the face's own frame: u along the eye line (unit: the distance between the eye centres),
v across it towards the mouth (unit: the eye-to-mouth distance). With dlib's 68 landmarks the outline is all
68 points (the jaw down to the chin included) plus the forehead of the template below; with 5 points (insightface:
eyes, nose, mouth corners) it is the template's jaw and forehead. The frame turns with the eye line, never with
a mouth corner.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import ConvexHull

from .faces import Face

JAW = ((-1.2, 0.0), (-1.15, 0.55), (-1.05, 0.85), (-0.95, 1.1), (-0.8, 1.4), (-0.6, 1.65), (-0.3, 1.85), (0.0, 1.95),
       (0.3, 1.85), (0.6, 1.65), (0.8, 1.4), (0.95, 1.1), (1.05, 0.85), (1.15, 0.55), (1.2, 0.0))
"""(u, v) of the jaw line: the symmetrised mean of dlib's 17 jaw points on the 10 real faces shipped in scikit-image,
matplotlib and insightface (chin at v 1.8; its spread 1.5-2.1 is why it sits at 1.95 here)."""
FOREHEAD = ((-1.15, -0.6), (-0.9, -1.0), (-0.45, -1.2), (0.0, -1.25), (0.45, -1.2), (0.9, -1.0), (1.15, -0.6))
"""(u, v) above the brows (which sit at v -0.35): up to about the hairline."""
MARGIN = 0.1
"""The hull grows by this fraction of its distance from the face's centre."""


def eyes_and_mouth(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Left eye, right eye and mouth centres of dlib's 68 points or insightface's 5, else None."""
    if len(points) == 68:
        return points[36:42].mean(0), points[42:48].mean(0), (points[48] + points[54]) / 2
    if len(points) == 5:
        return points[0], points[1], (points[3] + points[4]) / 2
    return None


def outline(face: Face) -> np.ndarray:
    """[N, 2] points whose hull is the face: from the eye line and mouth as the module says, or the box's corners
    for landmarks of another kind."""
    points = np.asarray(face.landmarks, dtype=np.float64).reshape(-1, 2)
    parts = eyes_and_mouth(points)
    if parts is None:
        x1, y1, x2, y2 = face.box
        return np.array([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], dtype=np.float64)
    left, right, mouth = parts
    centre = (left + right) / 2
    across = right - left
    u = across / max(float(np.linalg.norm(across)), 1e-6)
    v = np.array([-u[1], u[0]])
    down = max(float((mouth - centre) @ v), 0.5 * float(np.linalg.norm(across)))  # eye-to-mouth, across the eyes
    width = float(np.linalg.norm(across))
    template = np.array(FOREHEAD + (JAW if len(points) != 68 else ()), dtype=np.float64)
    drawn = centre + template[:, :1] * width * u + template[:, 1:] * down * v
    return np.concatenate([drawn, points]) if len(points) == 68 else drawn


def hull_mask(points: np.ndarray, height: int, width: int) -> torch.Tensor:
    """[H, W] 1 inside the convex hull of `points` (grown by MARGIN about their centre), 0 outside."""
    centre = points.mean(0)
    corners = points[ConvexHull(points).vertices]  # counter-clockwise
    corners = centre + (1 + MARGIN) * (corners - centre)
    x0, y0 = np.floor(corners.min(0)).astype(int).clip(0, [width, height])
    x1, y1 = (np.ceil(corners.max(0)).astype(int) + 1).clip(0, [width, height])
    mask = torch.zeros(height, width)
    if x1 <= x0 or y1 <= y0:
        return mask
    yy, xx = torch.meshgrid(torch.arange(y0, y1, dtype=torch.float64), torch.arange(x0, x1, dtype=torch.float64),
                            indexing="ij")
    inside = torch.ones_like(xx, dtype=torch.bool)
    for (ax, ay), (bx, by) in zip(corners, np.roll(corners, -1, axis=0)):
        inside &= (bx - ax) * (yy - ay) - (by - ay) * (xx - ax) >= 0
    mask[y0:y1, x0:x1] = inside.float()
    return mask


def face_mask(faces: list[Face], height: int, width: int, feather: float = 8.0) -> torch.Tensor:
    """MASK [H, W] in 0..1 covering each face (the hull of its outline, see the module), with a Gaussian edge of
    `feather` pixels."""
    mask = torch.zeros(height, width)
    for face in faces:
        mask = torch.maximum(mask, hull_mask(outline(face), height, width))
    if feather > 0 and bool(mask.any()):
        r = int(math.ceil(3 * feather))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * feather * feather))
        k = (k / k.sum()).view(1, 1, 1, -1)
        m = F.pad(mask[None, None], (r, r, r, r), mode="replicate")
        m = F.conv2d(F.conv2d(m, k), k.transpose(-1, -2))
        mask = m[0, 0].clamp(0, 1)
    return mask
