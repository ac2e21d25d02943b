"""Exact per-pixel variable-kernel Gaussian blur, the reference for xmgie_core.gaussian.

Deliberately naive: for every pixel its own 2-D sampled Gaussian (radius ceil(4 sigma)),
normalised, over the replicate-extended image. Only for small images.
"""

from __future__ import annotations

import math

import numpy as np


def exact_variable_blur(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """x [C,H,W] float64, sigma [H,W] -> [C,H,W]."""
    c, h, w = x.shape
    out = np.empty_like(x, dtype=np.float64)
    for i in range(h):
        for j in range(w):
            s = float(sigma[i, j])
            if s <= 0:
                out[:, i, j] = x[:, i, j]
                continue
            r = int(math.ceil(4 * s))
            d = np.arange(-r, r + 1)
            g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * s * s))
            g /= g.sum()
            rows = np.clip(i + d, 0, h - 1)
            cols = np.clip(j + d, 0, w - 1)
            patch = x[:, rows[:, None], cols[None, :]]
            out[:, i, j] = (patch * g).sum(axis=(1, 2))
    return out
