"""Identity protection at inference time (the U-Net stays frozen): faces keep the source's features and latent
where the edit region overlaps them, and best-of-N candidates are ranked by IPS."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import XMGIEInputError
from .faces import IdEmbed
from .masks import face_mask

TARGETS_FACE = 0.5
"""An edit region covering at least this fraction of a face edits that face: it is not protected."""


def protected_mask(mask: torch.Tensor, embed: IdEmbed, strength: float,
                   targets_face: float = TARGETS_FACE) -> tuple[torch.Tensor, list[str]]:
    """m' = m * (1 - strength * F) with F the faces' masks, so PFB treats protected faces as outside the edit
    (their features and latent stay the source's). A face the edit targets (m covers >= `targets_face` of it) is
    left out of F. Returns m' [B, H, W] at the mask's size and what was done, per face."""
    if not 0.0 <= strength <= 1.0:
        raise XMGIEInputError(f"face_protection must be between 0 and 1, got {strength}.")
    if mask.ndim == 2:
        mask = mask[None]
    h, w = embed.image_size
    if abs(h / w - mask.shape[-2] / mask.shape[-1]) > 0.02 * h / w:
        raise XMGIEInputError(f"The ID_EMBED was made from a {h}x{w} image but the mask is "
                              f"{mask.shape[-2]}x{mask.shape[-1]}: embed the same image the mask belongs to.")
    if len(embed.faces) not in (1, mask.shape[0]) and mask.shape[0] != 1:
        raise XMGIEInputError(f"The ID_EMBED has {len(embed.faces)} images but the mask batch is {mask.shape[0]}.")
    out, notes = [], []
    for b in range(max(mask.shape[0], len(embed.faces))):
        m = mask[min(b, mask.shape[0] - 1)].float()
        protect = torch.zeros_like(m)
        for i, face in enumerate(embed.faces[min(b, len(embed.faces) - 1)]):
            f = face_mask([face], h, w, feather=0)
            f = F.interpolate(f[None, None], size=m.shape, mode="bilinear", align_corners=False)[0, 0]
            covered = float((m * f).sum() / f.sum().clamp_min(1e-6))
            if covered >= targets_face:
                notes.append(f"image {b} face {i}: the edit covers {covered:.0%} of it, so it is edited, not protected")
                continue
            soft = F.interpolate(face_mask([face], h, w)[None, None], size=m.shape, mode="bilinear",
                                 align_corners=False)[0, 0]
            protect = torch.maximum(protect, torch.where(soft > 1 - 1e-5, 1.0, soft))  # the core exactly 1
            notes.append(f"image {b} face {i}: protected ({covered:.0%} of it inside the edit region)")
        out.append(m * (1 - strength * protect))
    return torch.stack(out), notes


def rank_by_ips(scores: list[float]) -> list[int]:
    """Candidate order for best-of-N: highest IPS first (stable for ties)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])
