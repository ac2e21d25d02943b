"""Drift outside the edit region: how much an edit changed the pixels it should have left alone.

With the source S and the edit E (IMAGE, 0..1) and the outside O = pixels whose mask value is below masks.INSIDE
and that lie more than `margin` pixels from the region (Euclidean, so a blend zone of that width can be left out);
without a mask O is the whole image:

  d(p)     = max over colour channels |E(p) - S(p)|                       (the per-pixel change)
  mean_abs = mean over O and channels |E - S|,  max_abs = max over O of d
  PSNR     = 10 log10(1 / MSE),  MSE = mean over O and channels (E - S)^2  (peak 1; +inf when E = S on O)

The heat map is d / full_scale through the "hot" colour map (black, red, yellow, white: r = 3t, g = 3t - 1,
b = 3t - 2, clamped) on O, and the source's grey level at a quarter of its brightness elsewhere (the region and the
margin), so an unchanged outside is black and the region stays recognisable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .distance import distance_to_boundary
from .masks import binarize
from .validation import check_range, mask_for_image, matching_images, rgb_image

FULL_SCALE = 0.05
FULL_SCALE_RANGE = (1.0 / 255.0, 1.0)
MARGIN = 0.0
MARGIN_RANGE = (0.0, 512.0)
REGION_BRIGHTNESS = 0.25


@dataclass(frozen=True)
class DriftStats:
    """One image's change outside the region (None when nothing lies outside)."""

    outside_pixels: int
    mean_abs: float | None
    max_abs: float | None
    psnr: float | None

    def describe(self) -> str:
        if not self.outside_pixels:
            return "nothing outside the mask to compare (the mask and its margin cover the image)"
        psnr = "inf (identical)" if math.isinf(self.psnr) else f"{self.psnr:.2f} dB"
        return (f"outside the mask ({self.outside_pixels} px): mean |change| {self.mean_abs:.5f} "
                f"({255 * self.mean_abs:.2f}/255), max |change| {self.max_abs:.5f} ({255 * self.max_abs:.1f}/255), "
                f"PSNR {psnr}")


@dataclass(frozen=True)
class Drift:
    heat_map: torch.Tensor
    """IMAGE [B,H,W,3]."""
    stats: list[DriftStats]

    def report(self) -> str:
        return "\n".join(f"image {i}: {s.describe()}" for i, s in enumerate(self.stats))


def outside_region(mask: torch.Tensor, margin: float) -> torch.Tensor:
    """O: bool [B,H,W], outside the binarised mask and farther than `margin` pixels from it."""
    region = binarize(mask)
    if margin <= 0:
        return ~region
    _, d_out = distance_to_boundary(region, cap=margin)
    return d_out > margin


def hot(t: torch.Tensor) -> torch.Tensor:
    """The "hot" colour map of t in 0..1 -> RGB [..., 3]."""
    return torch.stack([(3 * t - k).clamp(0.0, 1.0) for k in range(3)], dim=-1)


def drift_map(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor | None, full_scale: float = FULL_SCALE,
              margin: float = MARGIN) -> Drift:
    """The heat map and per-image statistics of the module docstring, for IMAGEs of one size (a batch of 1
    broadcasts) and a MASK at that size (one for all or one per image; None: the whole image is compared)."""
    check_range(full_scale, "full_scale", *FULL_SCALE_RANGE,
                hint="It is the change shown white on the heat map (0.05 = 5% of the range, about 13/255).")
    check_range(margin, "margin", *MARGIN_RANGE,
                hint="It leaves out a band this many pixels wide around the mask (e.g. the GB Compositor's "
                     "edge_width).")
    source, edited = matching_images(rgb_image(source, "source").float(), rgb_image(edited, "edited").float(),
                                     "source", "edited")
    if mask is None:
        outside = torch.ones(edited.shape[:3], dtype=torch.bool, device=edited.device)
    else:
        outside = outside_region(mask_for_image(mask, edited, "mask", "edited"), margin).to(edited.device)
    diff = edited - source
    change = diff.abs().amax(dim=-1)
    grey = source.mean(dim=-1, keepdim=True).expand_as(source) * REGION_BRIGHTNESS
    heat = torch.where(outside[..., None], hot((change / full_scale).clamp(0.0, 1.0)), grey)
    stats = []
    for item, keep in zip(diff, outside):
        values = item[keep]
        if values.numel() == 0:
            stats.append(DriftStats(0, None, None, None))
            continue
        mse = float(values.square().mean())
        stats.append(DriftStats(int(keep.sum()), float(values.abs().mean()), float(values.abs().max()),
                                math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)))
    return Drift(heat.contiguous(), stats)
