"""The identity preservation score ([xMGIE] §4.2) and its verdict, per face:

  IPS_f     = cos(E_id(X_edit)_f', E_id(X_src)_f)     f' = the edited face matched to source face f
  IPS_image = min_f IPS_f                              one changed face is never averaged away (a lost face: 0)

Matching is by place first: each source face takes the edited face nearest its place (centres at most one face
size apart, one-to-one by least total distance); a source face with none there is looked for again at its place
by the backend with a permissive detector (faces turned, darkened or half covered are still there); only then is it
matched by look among the edited faces that sit at no source face's place (it moved), else it is lost. A face that
changed into another person at the same place is therefore scored as that other person, never swapped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import XMGIEInputError
from ..image_io import to_rgb8
from .faces import Backend, Face, IdEmbed, cosine, embed_images

REACH = 1.0
"""A face is at a source face's place when their centres are at most REACH x the larger face's size apart."""
SAME_PERSON = {"dlib": 0.92, "insightface": 0.40}
"""Cosine at or above which two faces are judged one person. dlib: calibrated by benchmarks/bench_identity.py on
real portraits shipped in PyPI packages (same-person pairs: each portrait against perturbed copies of itself;
impostors: every pair of different people); the README gives the rates and what they rest on. insightface
(ArcFace): its usual 0.4, not calibrated here (no ArcFace weights can be installed from a package registry)."""


@dataclass(frozen=True)
class FaceScore:
    source: int
    """Index of the source face."""
    edited: Face | None
    """The edited face matched to it; None when it was lost."""
    ips: float
    how: str
    """'in place', 'found again in place', 'moved' or 'lost'."""


def same_person_threshold(backend: str) -> float:
    return SAME_PERSON["insightface" if backend.startswith("insightface") else "dlib"]


def _centre(face: Face) -> np.ndarray:
    x1, y1, x2, y2 = face.box
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2])


def _places(source: list[Face], edited: list[Face]) -> np.ndarray:
    """[S, E] centre distance over the larger face's size (sqrt of its box area)."""
    out = np.full((len(source), len(edited)), np.inf)
    for i, s in enumerate(source):
        for j, e in enumerate(edited):
            size = max(np.sqrt(s.area), np.sqrt(e.area), 1.0)
            out[i, j] = np.linalg.norm(_centre(s) - _centre(e)) / size
    return out


def _assign(cost: np.ndarray, allowed: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one pairs of least total cost among the allowed ones."""
    if not allowed.any():
        return []
    rows, cols = linear_sum_assignment(np.where(allowed, cost, 1e6))
    return [(int(i), int(j)) for i, j in zip(rows, cols) if allowed[i, j]]


def match_faces(source: list[Face], edited: list[Face], rgb: np.ndarray | None = None,
                backend: Backend | None = None) -> list[FaceScore]:
    """Each source face's score against its edited face, matched as the module says. Without `backend` (and the
    edited `rgb`) a face missing at its place is not looked for again."""
    near = _places(source, edited) <= REACH
    pairs = dict(_assign(_places(source, edited), near))
    found: dict[int, Face] = {i: edited[j] for i, j in pairs.items()}
    how = {i: "in place" for i in pairs}
    for i, face in enumerate(source):
        if i not in found and backend is not None and rgb is not None:
            again = backend.confirm(rgb, face.box, strict=False)
            if again is not None and _places([face], [again])[0, 0] <= REACH:
                found[i], how[i] = again, "found again in place"
    left = [i for i in range(len(source)) if i not in found]
    elsewhere = [j for j in range(len(edited)) if not near[:, j].any()]
    if left and elsewhere:
        looks = np.array([[cosine(source[i].embedding, edited[j].embedding) for j in elsewhere] for i in left])
        for a, b in _assign(-looks, np.ones_like(looks, dtype=bool)):
            found[left[a]], how[left[a]] = edited[elsewhere[b]], "moved"
    return [FaceScore(i, found.get(i), cosine(face.embedding, found[i].embedding) if i in found else 0.0,
                      how.get(i, "lost")) for i, face in enumerate(source)]


def verdict(ips: float, threshold: float) -> str:
    """'same person: 0.97, threshold 0.93' or 'another person: 0.88, threshold 0.93'."""
    return f"{'same person' if ips >= threshold else 'another person'}: {ips:.3f}, threshold {threshold:.2f}"


def describe(source: IdEmbed, scores: list[FaceScore], threshold: float) -> str:
    """One image's line: the worst face's score, then every face's verdict and how it was matched."""
    worst = min(scores, key=lambda s: s.ips)
    parts = []
    for s in scores:
        what = "not found in the edit" if s.edited is None else verdict(s.ips, threshold)
        parts.append(f"{source.label(s.source)}: {what}" + (f" ({s.how})" if s.how not in ("in place", "lost") else ""))
    head = f"IPS {worst.ips:.3f} (worst of {len(scores)} faces: {source.label(worst.source)})" if len(scores) > 1 \
        else f"IPS {worst.ips:.3f}"
    return f"{head}; {'; '.join(parts)}"


def batch_pairs(sources: int, edits: int) -> list[tuple[int, int]]:
    """(source, edit) batch indices: equal batches pair up, a batch of 1 goes with every image of the other."""
    if sources != edits and 1 not in (sources, edits):
        raise XMGIEInputError(f"The source ID_EMBED holds {sources} images but {edits} edited images were given, so "
                              "it is unclear which source face goes with which edit. Give equal batches (edit i is "
                              "scored against source i) or a source batch of 1 (every edit against it).")
    n = max(sources, edits)
    return [(min(b, sources - 1), min(b, edits - 1)) for b in range(n)]


def score_images(backend: Backend, source: IdEmbed, edited: torch.Tensor,
                 regions: tuple = ()) -> tuple[list[float], str]:
    """IPS_image per edited image (the worst face's) and the report: per image and face the score, the verdict
    and the threshold. `regions` are searched at full resolution too (find_faces)."""
    if source.empty:
        raise XMGIEInputError("The source ID_EMBED has no faces, so there is no identity to score. Run the ID "
                              "Embedder on an image with a face (or check its pass-through output).")
    pairs = batch_pairs(len(source.faces), int(edited.shape[0]))
    found = embed_images(backend, edited, -1, pass_through=True, regions=regions)
    pixels = to_rgb8(edited)
    threshold = same_person_threshold(backend.name)
    values, lines = [], []
    for b, (s, e) in enumerate(pairs):
        if not source.faces[s]:
            values.append(0.0)
            lines.append(f"image {b}: not scored, its source image {s} has no face")
            continue
        scores = match_faces(source.faces[s], found.faces[e], pixels[e], backend)
        values.append(min(x.ips for x in scores))
        lines.append(f"image {b}: {describe(source, scores, threshold)} [{backend.name}]")
    return values, "\n".join(lines)
