"""Gaussian kernels, uniform blur, and a fast spatially varying Gaussian blur.

The variable blur computes out(p) = (x * G_sigma(p))(p) without a per-pixel kernel loop:
x is blurred uniformly at a few sigma levels, and each pixel linearly interpolates the two
levels that bracket its own sigma. Levels are chosen so the interpolated kernel differs
from the exact one by at most `tol` in half-L1 norm, which bounds the output error by `tol`
for any image in 0..1. Work is done per tile, and only on tiles whose sigmas need a level.

Kernels are sampled Gaussians exp(-i^2 / 2 sigma^2), truncated at radius ceil(4 sigma) and
normalised to sum 1; image borders are extended by replication.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .tiles import TileSet

TOLERANCE = 0.8 / 255
"""Default max output error of the variable blur, for images in 0..1 (below 1/255)."""

SNAP_TOLERANCE = 0.05 / 255
"""Sigmas whose kernel is this close to the identity are treated as no blur (no work)."""

TILE = 64

PATCH_BUDGET = 1 << 22
"""Floats of gathered patches per group of tiles in the variable blur, at least (16 MB); more for large images."""


def kernel_radius(sigma: float) -> int:
    """Truncation radius ceil(4 sigma) of the sampled Gaussian."""
    return int(math.ceil(4.0 * sigma))


def gaussian_kernel_1d(sigma: float, radius: int | None = None) -> np.ndarray:
    """Normalised sampled Gaussian g_i = exp(-i^2 / 2 sigma^2) / sum, i in [-radius, radius]."""
    r = kernel_radius(sigma) if radius is None else radius
    i = np.arange(-r, r + 1, dtype=np.float64)
    if sigma <= 0:
        return (i == 0).astype(np.float64)
    g = np.exp(-(i * i) / (2.0 * sigma * sigma))
    g[np.abs(i) > kernel_radius(sigma)] = 0.0
    return g / g.sum()


def _outer(k: np.ndarray) -> np.ndarray:
    """2-D separable kernels k (x) k for a batch of 1-D kernels [..., n] -> [..., n, n]."""
    return k[..., :, None] * k[..., None, :]


def _half_l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """0.5 * ||a - b||_1 over the last two axes (2-D kernels)."""
    return 0.5 * np.abs(a - b).sum(axis=(-1, -2))


def _interval_error(sa: float, sb: float, samples: int = 12) -> float:
    """Worst half-L1 error of lerp(K_sa, K_sb) against K_s over s in [sa, sb] (2-D kernels)."""
    radius = kernel_radius(sb)  # every kernel in the interval fits
    s = np.linspace(sa, sb, samples + 2)[1:-1]
    t = ((s - sa) / (sb - sa))[:, None, None]
    lerp = (1 - t) * _outer(gaussian_kernel_1d(sa, radius)) + t * _outer(gaussian_kernel_1d(sb, radius))
    exact = _outer(np.stack([gaussian_kernel_1d(v, radius) for v in s]))
    return float(_half_l1(lerp, exact).max())


@lru_cache(maxsize=1)
def snap_sigma() -> float:
    """Largest sigma whose 2-D kernel is within SNAP_TOLERANCE of the identity (half-L1)."""
    lo, hi = 0.0, 1.0
    delta = gaussian_kernel_1d(0.0, 4)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _half_l1(_outer(gaussian_kernel_1d(mid, 4)), _outer(delta)) <= SNAP_TOLERANCE:
            lo = mid
        else:
            hi = mid
    return lo


@lru_cache(maxsize=64)
def blur_levels(sigma_max: float, tol: float = TOLERANCE) -> tuple[float, ...]:
    """Sigma levels 0 = s_0 < s_1 < ... < s_L = sigma_max for the variable blur.

    Greedy: from each level, the next is the largest sigma for which linear interpolation
    between the two levels stays within `tol` of the exact kernel (half-L1, 2-D) everywhere
    between them. That bound is the max output error for images in 0..1.
    """
    if sigma_max <= snap_sigma():
        return (0.0,)
    levels = [0.0]
    while levels[-1] < sigma_max:
        sa = levels[-1]
        if _interval_error(sa, sigma_max) <= tol:
            levels.append(sigma_max)
            break
        lo, hi = sa, min(sigma_max, 2 * sa + 1)  # successive levels are far closer than this
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if _interval_error(sa, mid) <= tol:
                lo = mid
            else:
                hi = mid
        levels.append(lo)
    return tuple(levels)


def _separable_blur_valid(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur [N,C,h,w] with the sampled Gaussian, 'valid' convolution (output shrinks by 2r).

    On the CPU, OpenCV's SIMD sepFilter2D runs over all planes stacked into one array (about 4x
    torch's conv2d here); rows a plane borrows from its neighbours land only in the cropped margin.
    Elsewhere, torch's conv2d.
    """
    n, c, h, w = x.shape
    g = gaussian_kernel_1d(sigma).astype(np.float32)
    r = (g.size - 1) // 2
    if x.device.type == "cpu":
        planes = x.detach().float().contiguous().numpy().reshape(n * c * h, w)
        out = cv2.sepFilter2D(planes, cv2.CV_32F, g, g, borderType=cv2.BORDER_REPLICATE)
        return torch.from_numpy(out).view(n, c, h, w)[:, :, r:h - r, r:w - r]
    k = torch.from_numpy(g).to(x.device, x.dtype)
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h - 2 * r, w - 2 * r)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Uniform Gaussian blur of [B,C,H,W] with replicated borders (the fixed-sigma case)."""
    r = kernel_radius(sigma)
    if r == 0:
        return x.clone()
    return _separable_blur_valid(F.pad(x, (r, r, r, r), mode="replicate"), sigma)


def blur_tiles(patches: torch.Tensor, sigma: torch.Tensor, levels: tuple[float, ...],
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Variable blur of tiles: patches [n,C,T+2R,T+2R] (halo R = kernel_radius(levels[-1])),
    per-pixel sigma [n,T,T] within [0, levels[-1]] -> [n,C,T,T].

    Each pixel lerps the two levels bracketing its sigma; a level no pixel needs is skipped.
    `progress(done, total)` is called after each level.
    """
    big_r = kernel_radius(levels[-1])
    t_size = patches.shape[-1] - 2 * big_r
    lv = torch.tensor(levels, device=sigma.device, dtype=torch.float32)
    hi = torch.searchsorted(lv, sigma.contiguous()).clamp(1, len(levels) - 1).unsqueeze(1)
    lo = hi - 1
    t = (sigma.unsqueeze(1) - lv[lo]) / (lv[hi] - lv[lo])
    out = patches[:, :, big_r:big_r + t_size, big_r:big_r + t_size] * torch.where(lo == 0, 1 - t, 0.0)
    for k in range(1, len(levels)):
        weight = torch.where(lo == k, 1 - t, 0.0) + torch.where(hi == k, t, 0.0)
        if bool(weight.any()):
            r = kernel_radius(levels[k])
            window = patches[:, :, big_r - r:big_r + t_size + r, big_r - r:big_r + t_size + r]
            out += weight * _separable_blur_valid(window, levels[k]).to(patches.device)
        if progress is not None:
            progress(k, len(levels) - 1)
    return out


def level_sigmas(sigma_max: float, tol: float = TOLERANCE) -> tuple[float, ...]:
    """blur_levels(sigma_max), or just (0,) when sigma_max is too small to blur anything."""
    return blur_levels(round(float(sigma_max), 6), tol) if sigma_max > snap_sigma() else (0.0,)


def variable_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float | None = None,
                           tol: float = TOLERANCE, tile: int = TILE,
                           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """out(p) = (x * G_sigma(p))(p): Gaussian blur of x [B,C,H,W] with a per-pixel sigma [B,H,W].

    Sigmas are clamped to [0, sigma_max] (default: the map's max); sigmas <= snap_sigma() are
    exact copies. Computed in float32 on x's device; returns x's dtype. Max error <= tol against
    the exact per-pixel kernel for x in 0..1. Work is done only on tiles with sigma > snap, in
    groups whose gathered patches (tile + halo) hold at most about one float32 copy of x, so the
    peak memory stays a few image copies whatever the mask (an 8-px checkerboard makes every tile
    active, and a halo of 4 sigma_max makes each patch up to 9x its tile). `progress(done, total)`
    is called per blur level of each group.
    """
    levels = level_sigmas(float(sigma.max()) if sigma_max is None else sigma_max, tol)
    s = sigma.to(x.device, torch.float32).clamp(0.0, levels[-1])
    active = s > snap_sigma()
    out = x.clone()
    if len(levels) == 1 or not bool(active.any()):
        return out
    halo = kernel_radius(levels[-1])
    tiles = TileSet.covering(active, tile)
    groups = tiles.split(max(1, max(x.numel(), PATCH_BUDGET) // (x.shape[1] * (tile + 2 * halo) ** 2)))
    xf, s = x.float(), torch.where(active, s, 0.0)[:, None]
    steps = len(levels) - 1
    for g, group in enumerate(groups):
        report = None if progress is None else \
            (lambda done, _, g=g: progress(g * steps + done, len(groups) * steps))
        blurred = blur_tiles(group.gather(xf, halo=halo), group.gather(s)[:, 0], levels, report)
        group.scatter(out, blurred.to(x.dtype))
    return out
