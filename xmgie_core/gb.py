"""Gaussian-blur (GB) compositing, xMGIE seed 000 section 3.6, eqs 18-19.

  D_edit   = distance transform of the binary edit mask M (each edited pixel's distance
             to the nearest unedited pixel);
  sigma(D) = sigma_max * exp(-D^2 / (2 sigma_s^2))                                  (eq 18)
  X_blur   = X_edit * (1 - M) + (X_edit * G_sigma(D)) * M                          (eq 19)

`gb_blur` is eq 19 as written. `gb_composite` blends an edit into its source with a soft edge
from the same machinery: alpha = M blurred with sigma(distance to the mask border, both sides),
exactly 0 farther outside than `edge_width` and exactly 1 farther inside, and
out = source * (1 - alpha) + edit * alpha, so far-outside pixels are the source bit for bit.

Images are [B,H,W,C] in 0..1, masks [B,H,W] or [H,W] (1 = edit), binarised at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distance import distance_to_boundary, distance_to_outside
from .errors import XMGIEInputError
from .gaussian import variable_gaussian_blur
from .validation import check_image, mask_for_image, matching_images

SIGMA_MAX = 5.0
SIGMA_SCALE = 10.0
EDGE_WIDTH = 16.0


@dataclass(frozen=True)
class GBResult:
    image: torch.Tensor
    """[B,H,W,C], the input's dtype and device."""
    mask: torch.Tensor
    """[B,H,W] float: blur mode, sigma(D)/sigma_max inside M (blur strength); composite, alpha."""


def sigma_map(distance: torch.Tensor, sigma_max: float = SIGMA_MAX, sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """Eq 18: sigma(D) = sigma_max * exp(-D^2 / (2 sigma_s^2)); +inf distance gives 0."""
    return sigma_max * torch.exp(-(distance * distance) / (2.0 * sigma_scale * sigma_scale))


def _check_params(sigma_max: float, sigma_scale: float) -> None:
    if not sigma_max >= 0:
        raise XMGIEInputError(f"sigma_max must be >= 0, got {sigma_max}.")
    if not sigma_scale > 0:
        raise XMGIEInputError(f"sigma_scale must be > 0, got {sigma_scale}.")


def _to_bchw(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 3, 1, 2)


def _to_bhwc(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 2, 3, 1)


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """M = mask >= 0.5 (soft masks are binarised for the distance transform)."""
    return mask >= 0.5


def gb_blur(edited: torch.Tensor, mask: torch.Tensor, sigma_max: float = SIGMA_MAX,
            sigma_scale: float = SIGMA_SCALE) -> GBResult:
    """Eq 19: X_blur = X_edit (1 - M) + (X_edit * G_sigma(D)) M, with sigma from eq 18."""
    _check_params(sigma_max, sigma_scale)
    check_image(edited, "edited image")
    m = binarize(mask_for_image(mask, edited, "mask", "edited image"))
    sigma = sigma_map(distance_to_outside(m), sigma_max, sigma_scale) * m
    blurred = _to_bhwc(variable_gaussian_blur(_to_bchw(edited), sigma, sigma_max))
    image = torch.where(m.unsqueeze(-1), blurred, edited)
    strength = sigma / sigma_max if sigma_max > 0 else sigma
    return GBResult(image, strength.to(edited.dtype))


def composite_alpha(mask: torch.Tensor, sigma_max: float = SIGMA_MAX, sigma_scale: float = SIGMA_SCALE,
                    edge_width: float = EDGE_WIDTH) -> torch.Tensor:
    """Soft blend weight [B,H,W] (float32) from a binary mask [B,H,W].

    alpha = M * G_sigma(D_b) with D_b the distance to the mask border on either side and
    sigma from eq 18; alpha = 0 where D_out > edge_width, 1 where D_in > edge_width.
    """
    d_in, d_out = distance_to_boundary(mask)
    border = torch.where(mask, d_in, d_out)
    sigma = sigma_map(border, sigma_max, sigma_scale)
    alpha = variable_gaussian_blur(mask.float().unsqueeze(1), sigma, sigma_max).squeeze(1)
    alpha = torch.where(d_out > edge_width, 0.0, alpha)
    return torch.where(d_in > edge_width, 1.0, alpha).clamp(0.0, 1.0)


def gb_composite(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, sigma_max: float = SIGMA_MAX,
                 sigma_scale: float = SIGMA_SCALE, edge_width: float = EDGE_WIDTH) -> GBResult:
    """out = source (1 - alpha) + edited alpha with alpha from `composite_alpha`.

    Pixels with alpha 0 (farther outside the mask than edge_width, or an empty mask) are
    the source exactly; pixels with alpha 1 are the edit exactly.
    """
    _check_params(sigma_max, sigma_scale)
    if not edge_width >= 0:
        raise XMGIEInputError(f"edge_width must be >= 0, got {edge_width}.")
    check_image(edited, "edited image")
    check_image(source, "source image")
    edited, source = matching_images(edited, source, "edited image", "source image")
    m = binarize(mask_for_image(mask, edited, "mask", "edited image"))
    alpha = composite_alpha(m, sigma_max, sigma_scale, edge_width).to(edited.device)
    a = alpha.unsqueeze(-1)
    blend = (source.float() * (1 - a) + edited.float() * a).to(edited.dtype)
    image = torch.where(a == 0, source, torch.where(a == 1, edited, blend))
    return GBResult(image, alpha.to(edited.dtype))


MODES = ("composite", "blur")


def apply_gb(edited: torch.Tensor, mask: torch.Tensor, mode: str = "composite", source: torch.Tensor | None = None,
             sigma_max: float = SIGMA_MAX, sigma_scale: float = SIGMA_SCALE,
             edge_width: float = EDGE_WIDTH) -> GBResult:
    """Run GB in `mode`: "composite" (needs `source`) or "blur" (eq 19; `source` unused)."""
    if mode == "blur":
        return gb_blur(edited, mask, sigma_max, sigma_scale)
    if mode != "composite":
        raise XMGIEInputError(f"Unknown GB mode {mode!r}; use one of {', '.join(MODES)}.")
    if source is None:
        raise XMGIEInputError(
            "GB mode 'composite' blends the edit into the source image, but no source image was given: "
            "connect the original (unedited) image to the 'source' input, or switch mode to 'blur'."
        )
    return gb_composite(edited, source, mask, sigma_max, sigma_scale, edge_width)
