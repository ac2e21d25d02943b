"""Faces and identity embeddings e_id = E_id(X) ([xMGIE] §3.5), found coarse to fine.

A backend (insightface ArcFace, dlib's ResNet; xmgie_core.identity.backends) offers two things:

  candidates(rgb) -> [(box, score)]        cheap, permissive detection (false alarms allowed)
  confirm(rgb, box, strict) -> Face|None   a look at the square around `box`, resampled so the face is a fixed
                                           size: strict = a confident face overlapping `box` (a candidate's
                                           check); not strict = any face there (where is the source face now?)

`find_faces` searches a copy of at most COARSE px (and each given region, e.g. an edit's crop, the same way),
then confirms every candidate at full resolution: large photos cost what a 1024-px one does, small faces in
them are still found, and a false alarm of the cheap detector (a name tag) must pass the confirmation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import XMGIEInputError
from ..image_io import to_rgb8

Box = tuple[float, float, float, float]
COARSE = 1024
"""Longer side of the copy (and of each region) the candidate search runs on."""
MAX_CANDIDATES = 24
"""At most this many candidates (best scores first) are confirmed per image."""


@dataclass(frozen=True)
class Face:
    box: Box
    """x1, y1, x2, y2 in pixels."""
    landmarks: np.ndarray
    """[K, 2] (x, y) points of the backend (insightface: 5 = eyes, nose, mouth corners; dlib: the 68-point set)."""
    score: float
    embedding: np.ndarray
    """L2-normalised."""

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def mapped(self, x0: float, y0: float, scale: float) -> "Face":
        """The face of a view (a crop at x0, y0 resampled by `scale`) in the full image's pixels."""
        x1, y1, x2, y2 = self.box
        return Face((x1 / scale + x0, y1 / scale + y0, x2 / scale + x0, y2 / scale + y0),
                    self.landmarks / scale + np.array([x0, y0], np.float32), self.score, self.embedding)


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

    def label(self, i: int) -> str:
        """The name of face i in reports: its index among all faces found (face_index), not in the chosen list."""
        return f"face {i if self.chosen is None else self.chosen}"


class Backend(Protocol):
    name: str

    def candidates(self, rgb: np.ndarray) -> list[tuple[Box, float]]: ...

    def confirm(self, rgb: np.ndarray, box: Box, strict: bool = True) -> Face | None: ...


def normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    if not n > 0:
        raise ValueError("a face embedding of zero length")
    return v / n


def by_size(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: -f.area)


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def pick(faces: list[Face], index: int) -> list[Face]:
    """All faces (index -1) or the index-th largest; an index beyond the faces found is a user error."""
    if index < 0:
        return faces
    if index >= len(faces):
        raise XMGIEInputError(f"face_index {index} asks for the {ordinal(index + 1)} largest face, but {len(faces)} "
                              "face(s) were found; use a smaller index, or -1 for all faces.")
    return [faces[index]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """IPS for one face pair: cos(e_a, e_b) of L2-normalised embeddings."""
    return float(np.dot(normalise(a), normalise(b)))


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def view(rgb: np.ndarray, box: Box, grow: float, side: float) -> tuple[np.ndarray, float, float, float]:
    """The square around `box`'s centre with sides `grow` x its longer side, resampled (bilinear, black outside
    the image) so that the box's longer side is `side` px -> (pixels, x0, y0, scale): view = (image - x0) * scale."""
    x1, y1, x2, y2 = box
    size = max(x2 - x1, y2 - y1, 1.0)
    scale = side / size
    half = grow * size / 2
    x0, y0 = (x1 + x2) / 2 - half, (y1 + y2) / 2 - half
    n = max(1, round(2 * half * scale))
    pixels = Image.fromarray(rgb).transform((n, n), Image.Transform.EXTENT, (x0, y0, x0 + 2 * half, y0 + 2 * half),
                                            Image.Resampling.BILINEAR)
    return np.asarray(pixels), x0, y0, n / (2 * half)


def shrunk(rgb: np.ndarray, longest: int) -> tuple[np.ndarray, float]:
    """`rgb` at most `longest` px on its longer side (antialiased) and the scale applied."""
    scale = min(1.0, longest / max(rgb.shape[:2]))
    if scale == 1.0:
        return rgb, 1.0
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX)), scale


def distinct(boxes: list[tuple[Box, float]], overlap: float = 0.5) -> list[tuple[Box, float]]:
    """Non-maximum suppression: best score first, a box overlapping a kept one by IoU >= `overlap` is dropped."""
    kept: list[tuple[Box, float]] = []
    for box, score in sorted(boxes, key=lambda b: -b[1]):
        if all(iou(box, k) < overlap for k, _ in kept):
            kept.append((box, score))
    return kept


def find_faces(backend: Backend, rgb: np.ndarray, regions: tuple[Box, ...] = ()) -> list[Face]:
    """Every face of `rgb`, largest first: candidates on a copy of at most COARSE px and on each region (x1, y1,
    x2, y2 in pixels, searched the same way), each confirmed at full resolution."""
    found: list[tuple[Box, float]] = []
    h, w = rgb.shape[:2]
    for x1, y1, x2, y2 in ((0, 0, w, h), *regions):
        x1, y1, x2, y2 = (int(max(0, x1)), int(max(0, y1)), int(min(w, x2)), int(min(h, y2)))
        if x2 - x1 < 8 or y2 - y1 < 8:
            continue
        small, s = shrunk(np.ascontiguousarray(rgb[y1:y2, x1:x2]), COARSE)
        found += [((b[0] / s + x1, b[1] / s + y1, b[2] / s + x1, b[3] / s + y1), score)
                  for b, score in backend.candidates(small)]
    faces: list[Face] = []
    for box, _ in distinct(found)[:MAX_CANDIDATES]:
        face = backend.confirm(rgb, box, strict=True)
        if face is not None and all(iou(face.box, f.box) < 0.5 for f in faces):
            faces.append(face)
    return by_size(faces)


def embed_images(backend: Backend, image: torch.Tensor, face_index: int = -1, pass_through: bool = False,
                 regions: tuple[Box, ...] = ()) -> IdEmbed:
    """Faces of every image of the batch (find_faces), largest first, all or the index-th. An image without a
    face is an error unless `pass_through` (then its list is empty: nothing to protect)."""
    faces, notes = [], []
    for b, rgb in enumerate(to_rgb8(image)):
        found = find_faces(backend, rgb, regions)
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
