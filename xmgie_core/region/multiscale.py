"""Multi-scale region prediction: the region's scale follows the edit (a cup vs the whole sky).

The predictor scores N = g x g patches of a view resized to S x S; at scale 1 the view is the whole image, so a patch
covers (H/g) x (W/g) pixels (14 x 14 at 224 px, 56 x 56 on a 896 px photo) and a small object that fills a fraction of
one patch barely moves P_region. At scale k the image is covered by a k x k grid of overlapping crops, each resized to
S x S: patches are k times finer, and a small object fills whole patches.

  P_k(x)  = mean over the scale-k views covering x of that view's P_region, bilinearly upsampled   (same scale:
            overlapping views are alternative estimates of the same pixels)
  P(x)    = max_k P_k(x)                                                                           (across scales:
            P_region is an independent per-patch sigmoid, "edit this patch"; a region is kept at whichever scale
            resolves it, as multi-scale detectors take the union of their scales' detections)

A large target is found whole at scale 1; a small one at the finer scales. The cost is sum_k k^2 predictor passes.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import XMGIEInputError

OVERLAP = 0.25
"""Each crop at scale k is (1 + OVERLAP) / k of the image side, so neighbouring crops share a margin."""

GridPredictor = Callable[[torch.Tensor], torch.Tensor]
"""views [V, 3, S, S] in 0..1 -> P_region on the patch grid [V, g, g]."""


def crop_boxes(height: int, width: int, scale: int, overlap: float = OVERLAP) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of the scale x scale crops covering an image, evenly spaced, each
    min(1, (1 + overlap) / scale) of the side (scale 1: the whole image)."""
    if scale < 1:
        raise XMGIEInputError(f"Region scales must be positive integers, got {scale}.")

    def spans(side: int) -> list[tuple[int, int]]:
        size = min(side, max(1, math.ceil(side * (1 + overlap) / scale)))
        starts = [round(i * (side - size) / (scale - 1)) if scale > 1 else 0 for i in range(scale)]
        return [(s, s + size) for s in starts]

    return [(t, l, b, r) for t, b in spans(height) for l, r in spans(width)]


def views(images: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], size: int) -> torch.Tensor:
    """Crops [B * len(boxes), 3, size, size] of images [B, 3, H, W] (image-major), each resized to size x size."""
    crops = [F.interpolate(images[:, :, t:b, l:r], size=(size, size), mode="bilinear", antialias=True,
                           align_corners=False) for t, l, b, r in boxes]
    return torch.stack(crops, dim=1).flatten(0, 1)


def paste_mean(grids: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], height: int, width: int
               ) -> torch.Tensor:
    """P_k: each view's grid [B, V, g, g] upsampled onto its box and averaged where boxes overlap -> [B, H, W]."""
    total = grids.new_zeros(grids.shape[0], height, width)
    count = grids.new_zeros(1, height, width)
    for v, (t, l, b, r) in enumerate(boxes):
        total[:, t:b, l:r] += F.interpolate(grids[:, v:v + 1], size=(b - t, r - l), mode="bilinear",
                                            align_corners=False)[:, 0]
        count[:, t:b, l:r] += 1
    return total / count


def multiscale_probability(predict: GridPredictor, images: torch.Tensor, size: int, scales: Sequence[int],
                           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """P(x) = max_k P_k(x) for images [B, 3, H, W] in 0..1 -> [B, H, W] in [0, 1]."""
    b, _, h, w = images.shape
    plans = [crop_boxes(h, w, k) for k in sorted(set(scales))]
    total, done = sum(len(p) for p in plans), 0
    fused = None
    for boxes in plans:
        grids = predict(views(images, boxes, size))
        scale_map = paste_mean(grids.view(b, len(boxes), *grids.shape[-2:]).float(), boxes, h, w)
        fused = scale_map if fused is None else torch.maximum(fused, scale_map)
        done += len(boxes)
        if progress is not None:
            progress(done, total)
    return fused.clamp(0, 1)
