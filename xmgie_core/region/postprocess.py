"""From a region score map to what the other nodes take: the soft map and the binary MASK at the image's size.

  soft = smooth_s(normalise(resize(score)))         s = smoothing sigma in pixels (0 = none)
  mask = grow_g([soft >= threshold])                g > 0 dilates, g < 0 erodes, by |g| pixels (Euclidean)

`normalise` divides each image's map by its range (DiffEdit's [0, 1] normalisation; used for the U-Net modes, whose
scores have no absolute scale); probabilities (the learned predictor, CLIPSeg) are kept as they are, so an image
without the target stays empty. An empty result is a valid answer (nothing to edit), reported, never an error.
`region_preview` shows the result over the photo for a glance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distance import distance_to_outside
from ..errors import XMGIEInputError
from ..gaussian import gaussian_blur
from ..validation import check_finite, check_range, mask_for_image, rgb_image

GROW_RANGE = (-512, 512)
SMOOTH_RANGE = (0.0, 64.0)


@dataclass(frozen=True)
class Finish:
    threshold: float = 0.5
    grow: int = 0
    smooth: float = 0.0
    normalise: bool = False

    def __post_init__(self) -> None:
        check_range(self.threshold, "threshold", 0.0, 1.0, "0.5 keeps pixels the predictor more likely edits than not")
        check_range(self.grow, "grow/shrink pixels", *GROW_RANGE, "negative values shrink the region")
        check_range(self.smooth, "smoothing", *SMOOTH_RANGE, "a Gaussian sigma in pixels; 0 turns it off")


def normalise(score: torch.Tensor) -> torch.Tensor:
    """Per image (score - min) / (max - min) on [B, H, W]; an image whose map is constant becomes 0."""
    low = score.flatten(1).amin(dim=1).view(-1, 1, 1)
    span = score.flatten(1).amax(dim=1).view(-1, 1, 1) - low
    return torch.where(span > 0, (score - low) / span.clamp_min(torch.finfo(score.dtype).tiny), torch.zeros_like(score))


def grow_shrink(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (pixels > 0) or erode (pixels < 0) a binary [B, H, W] mask by a Euclidean radius of |pixels|."""
    if pixels == 0:
        return mask
    if pixels > 0:
        return (distance_to_outside(1 - mask) <= pixels).to(mask.dtype)
    return (distance_to_outside(mask) > -pixels).to(mask.dtype)


def finish_region(score: torch.Tensor, height: int, width: int, finish: Finish) -> tuple[torch.Tensor, torch.Tensor]:
    """score [B, h, w] -> (mask [B, H, W] in {0, 1}, soft [B, H, W] in [0, 1]), float32 on the CPU."""
    if score.ndim != 3:
        raise XMGIEInputError(f"A region score map must be [batch, height, width], got {tuple(score.shape)}.")
    check_finite(score, "The region score map")
    soft = score.detach().float().cpu()
    if soft.shape[-2:] != (height, width):
        soft = F.interpolate(soft[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    if finish.normalise:
        soft = normalise(soft)
    if finish.smooth > 0:
        soft = gaussian_blur(soft[:, None], finish.smooth)[:, 0]
    soft = soft.clamp(0, 1)
    mask = grow_shrink((soft >= finish.threshold).float(), finish.grow)
    return mask, soft


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
