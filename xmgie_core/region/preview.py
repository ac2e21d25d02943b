"""The region over the photo, for a glance: red tint by the soft map inside the mask, a darker photo outside."""

from __future__ import annotations

import torch

from ..validation import mask_for_image, rgb_image

TINT = (1.0, 0.15, 0.1)


def region_preview(image: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor, opacity: float = 0.55) -> torch.Tensor:
    """IMAGE [B, H, W, 3]: inside the mask, the photo blended towards red by opacity * soft (at least half of it);
    outside, the photo at 60 % brightness. mask/soft [B or 1, H, W] at the image's size."""
    rgb = rgb_image(image).float()
    m = mask_for_image(mask, rgb, "region mask").float()[..., None]
    s = mask_for_image(soft, rgb, "region probability").float()[..., None]
    tint = torch.tensor(TINT, dtype=rgb.dtype, device=rgb.device)
    a = opacity * torch.maximum(s, torch.full_like(s, 0.5))
    inside = rgb * (1 - a) + tint * a
    return (m * inside + (1 - m) * rgb * 0.6).clamp(0, 1)
