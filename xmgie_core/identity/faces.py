"""Faces, identity embeddings and the identity preservation score (xMGIE [xMGIE] §3.5 and §4.2).

  e_id = E_id(X)                                  a face recognizer's embedding, L2-normalised
  IPS  = cos(E_id(X_edit), E_id(X_src))           per face, matched between the two images

The recognizer is a backend (insightface ArcFace, dlib's ResNet); everything here works on what any backend
returns: a box, landmarks, a detection score and an embedding per face.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import XMGIEInputError
from ..image_io import to_rgb8


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 in pixels."""
    landmarks: np.ndarray
    """[K, 2] (x, y) points of the backend (insightface: eyes, nose, mouth corners; dlib: eye corners, nose)."""
    score: float
    embedding: np.ndarray
    """L2-normalised."""

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


@dataclass(frozen=True)
class IdEmbed:
    """ID_EMBED: the faces of each image of a batch (largest first), the image size and the backend."""

    faces: list[list[Face]]
    image_size: tuple[int, int]
    """height, width."""
    backend: str
    chosen: int | None = None
    """The face index the embedder was asked for (None: all faces)."""
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not any(self.faces)


def normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    if not n > 0:
        raise ValueError("a face embedding of zero length")
    return v / n


def by_size(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: -f.area)


def pick(faces: list[Face], index: int) -> list[Face]:
    """All faces (index -1) or the index-th largest; an index beyond the faces found is a user error."""
    if index < 0:
        return faces
    if index >= len(faces):
        raise XMGIEInputError(f"face_index {index} asks for the {index + 1}th largest face, but {len(faces)} face(s) "
                              "were found; use a smaller index, or -1 for all faces.")
    return [faces[index]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """IPS for one face pair: cos(e_a, e_b) of L2-normalised embeddings."""
    return float(np.dot(normalise(a), normalise(b)))


def iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class FaceScore:
    source: int
    """Index of the source face."""
    edited: int | None
    """Index of the matched edited face; None when no edited face matches (the face was lost)."""
    ips: float


def match_faces(source: list[Face], edited: list[Face], min_iou: float = 0.3) -> list[FaceScore]:
    """Each source face's IPS against the edited face at the same place (highest box IoU >= min_iou), else the
    most similar unused edited face; a source face with no edited face left scores 0."""
    used: set[int] = set()
    scores = []
    for i, face in enumerate(source):
        free = [j for j in range(len(edited)) if j not in used]
        placed = [j for j in free if iou(face.box, edited[j].box) >= min_iou]
        pool = placed or free
        if not pool:
            scores.append(FaceScore(i, None, 0.0))
            continue
        key = (lambda j: iou(face.box, edited[j].box)) if placed else (lambda j: cosine(face.embedding, edited[j].embedding))
        j = max(pool, key=key)
        used.add(j)
        scores.append(FaceScore(i, j, cosine(face.embedding, edited[j].embedding)))
    return scores


def face_mask(faces: list[Face], height: int, width: int, feather: float = 8.0, grow: float = 1.15) -> torch.Tensor:
    """MASK [H, W] in 0..1 covering each face: an ellipse through the box (grown by `grow`), centred on the
    landmarks' centroid and turned with the line through the two outermost landmarks (the eyes), with a
    Gaussian edge of `feather` pixels."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    mask = torch.zeros(height, width)
    for face in faces:
        x1, y1, x2, y2 = face.box
        pts = np.asarray(face.landmarks, dtype=np.float32).reshape(-1, 2)
        cx, cy = (pts.mean(axis=0) if len(pts) else ((x1 + x2) / 2, (y1 + y2) / 2))
        cx, cy = 0.5 * (cx + (x1 + x2) / 2), 0.5 * (cy + (y1 + y2) / 2)
        angle = 0.0
        if len(pts) >= 2:
            left, right = pts[pts[:, 0].argmin()], pts[pts[:, 0].argmax()]
            angle = math.atan2(float(right[1] - left[1]), float(right[0] - left[0]))
        a, b = grow * (x2 - x1) / 2, grow * 1.1 * (y2 - y1) / 2
        c, s = math.cos(angle), math.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        mask = torch.maximum(mask, inside.float())
    if feather > 0 and bool(mask.any()):
        r = int(math.ceil(3 * feather))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * feather * feather))
        k = (k / k.sum()).view(1, 1, 1, -1)
        m = F.pad(mask[None, None], (r, r, r, r), mode="replicate")
        m = F.conv2d(F.conv2d(m, k), k.transpose(-1, -2))
        mask = m[0, 0].clamp(0, 1)
    return mask


SAME_PERSON = {"dlib": 0.91, "insightface": 0.40}
"""Cosine above which a backend's two faces are likely one person: dlib's own Euclidean threshold 0.6 on its
unnormalised descriptors (norm ~1.45) is cos ~0.91 (its range is narrow: a different real person scored 0.88);
ArcFace (insightface) separates people far more widely, and 0.4 is its usual threshold."""


def same_person_threshold(backend: str) -> float:
    return SAME_PERSON["insightface" if backend.startswith("insightface") else "dlib"]


def verdict(ips: float, threshold: float) -> str:
    return f"IPS {ips:.3f} ({'same person' if ips >= threshold else 'looks like another person'})"


def ips_report(source: IdEmbed, edited: IdEmbed) -> tuple[list[float], str]:
    """IPS per batch item (mean over the source faces; a lost face counts 0) and a readable report."""
    if source.empty:
        raise XMGIEInputError("The source ID_EMBED has no faces, so there is no identity to score. Run the ID "
                              "Embedder on an image with a face (or check its pass-through output).")
    n = max(len(source.faces), len(edited.faces))
    values, lines = [], []
    for b in range(n):
        src = source.faces[min(b, len(source.faces) - 1)]
        out = edited.faces[min(b, len(edited.faces) - 1)]
        scores = match_faces(src, out)
        value = float(np.mean([s.ips for s in scores])) if scores else 0.0
        values.append(value)
        threshold = same_person_threshold(edited.backend)
        parts = [f"face {s.source}: " + (verdict(s.ips, threshold) if s.edited is not None else "not found in the edit")
                 for s in scores]
        lines.append(f"image {b}: IPS {value:.3f} ({'; '.join(parts)}) [{edited.backend}, same person above "
                     f"{threshold:.2f}]")
    return values, "\n".join(lines)


def embed_images(backend, image: torch.Tensor, face_index: int = -1, pass_through: bool = False) -> IdEmbed:
    """Faces of every image of the batch with `backend.faces(rgb)`, largest first, all or the index-th.
    An image without a face is an error unless `pass_through` (then its list is empty: nothing to protect)."""
    faces, notes = [], []
    for b, rgb in enumerate(to_rgb8(image)):
        found = backend.faces(rgb)
        if not found:
            if not pass_through:
                raise XMGIEInputError(
                    f"No face found in image {b} of the batch ({rgb.shape[1]}x{rgb.shape[0]}, backend "
                    f"{backend.name}). Use an image with a clearly visible face (at least ~40 px wide), try the "
                    "other backend, or turn on pass_through to go on without identity protection.")
            notes.append(f"image {b}: no face found")
            faces.append([])
            continue
        faces.append(pick(found, face_index))
    return IdEmbed(faces, (int(image.shape[1]), int(image.shape[2])), backend.name,
                   None if face_index < 0 else face_index, notes)
