"""Edit regions, shared by every technique: the one "inside" rule, empty checks, and the region at each layer's
token grid (RegionPyramid) that CAM masks attention with and PFB blends features with.

A MASK holds 1 = edit; a soft value counts as inside when it is at least INSIDE (0.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import XMGIEInputError
from .validation import check_mask

INSIDE = 0.5
"""A mask value at least this is inside the region."""


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """M = mask >= INSIDE (soft masks made binary: distance transforms, crop boxes, CAM rows)."""
    return mask >= INSIDE


def is_empty(mask: torch.Tensor) -> bool:
    """No value of the mask is inside."""
    return not bool(binarize(mask).any())


def empty_items(mask: torch.Tensor) -> list[int]:
    """Indices of the batch items of a MASK [B, H, W] with no inside pixel."""
    return [i for i in range(mask.shape[0]) if is_empty(mask[i])]


class RegionPyramid:
    """A binary (or, with `coverage`, soft) region at each U-Net layer's grid, cached per resolution.

    The mask [B, H, W] (1 = region) is area-averaged onto the h x w grid of a layer (row-major
    tokens) and thresholded: a cell is inside when at least `threshold` of it is covered, so
    coarse layers do not leak across the border. A region that would vanish at a coarse grid
    keeps its best-covered cell(s), so small regions are never lost.
    """

    def __init__(self, mask: torch.Tensor, threshold: float = 0.5, name: str = "The CAM mask",
                 allow_empty: bool = False):
        mask = check_mask(mask, name)
        if not 0.0 < threshold <= 1.0:
            raise XMGIEInputError(f"threshold must be in (0, 1], got {threshold}.")
        if not allow_empty and is_empty(mask):
            raise XMGIEInputError(
                f"{name} is empty (no value >= 0.5): the edit words would act nowhere. "
                "Paint the region to edit, or bypass the Cross-Attention Mask node."
            )
        self.mask = mask.float()
        self.threshold = threshold
        self.name = name
        self._cache: dict[tuple, torch.Tensor] = {}

    def coverage(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Soft region [B, h, w] in [0, 1] (float32): the fraction of each cell of an h x w grid the mask covers
        (area average; used where a soft edge is wanted, e.g. PFB's blending weights)."""
        key = ("coverage", h, w, str(device))
        if key not in self._cache:
            self._check_aspect(h, w)
            self._cache[key] = F.adaptive_avg_pool2d(self.mask[:, None], (h, w))[:, 0].clamp(0, 1).to(device)
        return self._cache[key]

    def grid(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Region [B, h*w] in {0, 1} (float32) at an h x w token grid."""
        key = (h, w, str(device))
        if key not in self._cache:
            cover = self.coverage(h, w)
            inside = cover >= self.threshold - 1e-6
            best = cover.flatten(1).amax(dim=1)
            lost = ~inside.flatten(1).any(dim=1) & (best > 0)
            inside = inside | (lost[:, None, None] & (cover >= best[:, None, None] - 1e-6))
            self._cache[key] = inside.flatten(1).float().to(device)
        return self._cache[key]

    def _check_aspect(self, h: int, w: int) -> None:
        """The mask must have the latent's aspect ratio (a grid side may be one cell over, from ceil)."""
        mh, mw = self.mask.shape[-2:]
        ratio = mh / mw
        low = (h - 1) / w if h > 1 else 0.0
        high = h / (w - 1) if w > 1 else float("inf")
        if not low * 0.97 <= ratio <= high * 1.03:
            raise XMGIEInputError(
                f"{self.name} is {mh}x{mw} (height x width) but the latent's grid at this U-Net layer is {h}x{w}: their "
                "aspect ratios differ. Resize or crop the mask to the image's size."
            )

    def for_tokens(self, n_tokens: int, latent_hw: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Region for a layer with `n_tokens` queries when the U-Net input is latent_hw (h, w)."""
        return self.grid(*infer_grid(n_tokens, latent_hw), device)


def infer_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) token grid of a U-Net layer: the latent downsampled by a power of two (ceil)."""
    h, w = latent_hw
    for level in range(8):
        f = 2**level
        gh, gw = math.ceil(h / f), math.ceil(w / f)
        if gh * gw == n_tokens:
            return gh, gw
    raise XMGIEInputError(f"Cannot place {n_tokens} attention tokens on a grid for a {h}x{w} latent.")
