"""IPS per face ([xMGIE] §4.2) of an edit against its source, through the pack's own scoring (identity.scoring):
faces found with `embed_images`, matched by `match_faces` (by place, found again in place, moved, or lost = 0),
IPS_f = cos(E_id(edit)_f', E_id(source)_f); the image's IPS is the worst face's (min)."""

from __future__ import annotations

import torch

from ..identity.faces import Backend, embed_images
from ..identity.scoring import match_faces
from ..image_io import to_rgb8


def ips_per_face(backend: Backend, source: torch.Tensor, edit: torch.Tensor) -> list[float] | None:
    """IPS of each source face (largest first) in the edit; None when the source has no face."""
    faces = embed_images(backend, source, pass_through=True).faces[0]
    if not faces:
        return None
    found = embed_images(backend, edit, pass_through=True).faces[0]
    return [s.ips for s in match_faces(faces, found, to_rgb8(edit)[0], backend)]
