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

import numpy as np
import torch
import torch.nn.functional as F

TOLERANCE = 0.8 / 255
"""Default max output error of the variable blur, for images in 0..1 (below 1/255)."""

SNAP_TOLERANCE = 0.05 / 255
"""Sigmas whose kernel is this close to the identity are treated as no blur (no work)."""

TILE = 64


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


def _half_l1_2d(ka: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """0.5 * ||ka (x) ka - kb (x) kb||_1 for batches of 1-D kernels [..., n] (2-D separable kernels)."""
    d = ka[..., :, None] * ka[..., None, :] - kb[..., :, None] * kb[..., None, :]
    return 0.5 * np.abs(d).sum(axis=(-1, -2))


def _interval_error(sa: float, sb: float, radius: int, samples: int = 12) -> float:
    """Worst half-L1 error of lerp(K_sa, K_sb) against K_s over s in [sa, sb] (2-D kernels)."""
    s = np.linspace(sa, sb, samples + 2)[1:-1]
    t = (s - sa) / (sb - sa)
    ka = gaussian_kernel_1d(sa, radius)
    kb = gaussian_kernel_1d(sb, radius)
    exact = np.stack([gaussian_kernel_1d(v, radius) for v in s])
    a2 = ka[:, None] * ka[None, :]
    b2 = kb[:, None] * kb[None, :]
    lerp = (1 - t)[:, None, None] * a2 + t[:, None, None] * b2
    e2 = exact[:, :, None] * exact[:, None, :]
    return float(0.5 * np.abs(lerp - e2).sum(axis=(-1, -2)).max())


@lru_cache(maxsize=64)
def snap_sigma() -> float:
    """Largest sigma whose 2-D kernel is within SNAP_TOLERANCE of the identity (half-L1)."""
    lo, hi = 0.0, 1.0
    delta = gaussian_kernel_1d(0.0, 4)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _half_l1_2d(gaussian_kernel_1d(mid, 4), delta) <= SNAP_TOLERANCE:
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
    radius = kernel_radius(sigma_max)
    levels = [0.0]
    while levels[-1] < sigma_max:
        sa = levels[-1]
        lo, hi = sa, sigma_max
        if _interval_error(sa, hi, radius) <= tol:
            levels.append(sigma_max)
            break
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if _interval_error(sa, mid, radius) <= tol:
                lo = mid
            else:
                hi = mid
        levels.append(lo)
    return tuple(levels)


def _separable_blur_valid(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur [N,C,h,w] with the sampled Gaussian, 'valid' convolution (output shrinks by 2r)."""
    n, c, h, w = x.shape
    g = torch.from_numpy(gaussian_kernel_1d(sigma)).to(x.device, x.dtype)
    k = g.numel()
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(y, g.view(1, 1, 1, k))
    y = F.conv2d(y, g.view(1, 1, k, 1))
    return y.reshape(n, c, h - k + 1, w - k + 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Uniform Gaussian blur of [B,C,H,W] with replicated borders (the fixed-sigma case)."""
    r = kernel_radius(sigma)
    if r == 0:
        return x.clone()
    return _separable_blur_valid(F.pad(x, (r, r, r, r), mode="replicate"), sigma)


def _tiles(t: torch.Tensor, tile: int) -> torch.Tensor:
    """View [B,C,Hp,Wp] as [B,ny,nx,C,tile,tile] (Hp, Wp multiples of tile)."""
    b, c, hp, wp = t.shape
    return t.view(b, c, hp // tile, tile, wp // tile, tile).permute(0, 2, 4, 1, 3, 5)


def level_weight(s: torch.Tensor, levels: tuple[float, ...], k: int) -> torch.Tensor:
    """Linear-interpolation weight of level k at sigma s: the hat function on levels k-1, k, k+1."""
    w = torch.zeros_like(s)
    if k > 0:
        a, b = levels[k - 1], levels[k]
        w = torch.where((s > a) & (s <= b), (s - a) / (b - a), w)
    if k + 1 < len(levels):
        a, b = levels[k], levels[k + 1]
        w = torch.where((s >= a) & (s < b), (b - s) / (b - a), w)
    return torch.where(s == levels[k], 1.0, w)


def variable_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float | None = None,
                           tol: float = TOLERANCE, tile: int = TILE) -> torch.Tensor:
    """out(p) = (x * G_sigma(p))(p): Gaussian blur of x [B,C,H,W] with a per-pixel sigma [B,H,W].

    Sigmas are clamped to [0, sigma_max] (default: the map's max). Computed in float32 on x's
    device; returns x's dtype. Max error <= tol against the exact per-pixel kernel (x in 0..1).
    """
    out_dtype = x.dtype
    x = x.float()
    b, c, h, w = x.shape
    smax = float(sigma.max()) if sigma_max is None else float(sigma_max)
    levels = blur_levels(round(smax, 6), tol) if smax > snap_sigma() else (0.0,)
    s = sigma.to(x.device, torch.float32).clamp(0.0, levels[-1])
    s = torch.where(s <= snap_sigma(), 0.0, s)
    if len(levels) == 1 or not bool((s > 0).any()):
        return x.to(out_dtype).clone()

    hp, wp = -(-h // tile) * tile, -(-w // tile) * tile
    s_p = F.pad(s, (0, wp - w, 0, hp - h)).unsqueeze(1)
    out = F.pad(x, (0, wp - w, 0, hp - h)) * level_weight(s_p, levels, 0)
    s_tiles, out_tiles = _tiles(s_p, tile), _tiles(out, tile)
    tile_min, tile_max = s_tiles.amin(dim=(3, 4, 5)), s_tiles.amax(dim=(3, 4, 5))
    big_r = kernel_radius(levels[-1])
    xp = F.pad(x, (big_r, big_r + wp - w, big_r, big_r + hp - h), mode="replicate")

    for k in range(1, len(levels)):
        above = levels[k + 1] if k + 1 < len(levels) else math.inf
        need = (tile_max > levels[k - 1]) & (tile_min < above)
        if not bool(need.any()):
            continue
        bi, ty, tx = need.nonzero(as_tuple=True)
        r = kernel_radius(levels[k])
        span = torch.arange(tile + 2 * r, device=x.device) + (big_r - r)
        rows = (ty * tile)[:, None] + span
        cols = (tx * tile)[:, None] + span
        patches = xp[bi[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        weight = level_weight(s_tiles[bi, ty, tx], levels, k)
        out_tiles[bi, ty, tx] += weight * _separable_blur_valid(patches, levels[k])
    return out[:, :, :h, :w].to(out_dtype)
